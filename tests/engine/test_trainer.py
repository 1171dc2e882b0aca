"""The trainer in this process (one real gloo rank): frozen modules cost no optimizer state,
bad losses are dropped and counted, out-of-memory is reported with advice."""

from __future__ import annotations

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.engine.trainer import Trainer, TrainingError
from tests.engine.conftest import stage_config


@pytest.fixture
def make_trainer(demo, tmp_path, one_rank):
    def make(**sections) -> Trainer:
        cfg = load_config(stage_config(demo, tmp_path / "run", **sections))
        return Trainer(cfg, *one_rank, resume="none")

    return make


def test_frozen_modules_take_no_gradient_and_no_optimizer_state(make_trainer):
    trainer = make_trainer(train={"steps": 2})
    model = trainer.engine.module
    vit_before = {k: v.clone() for k, v in model.vit.state_dict().items()}
    assert trainer.run() == 0
    assert all(torch.equal(v, model.vit.state_dict()[k]) for k, v in vit_before.items())
    assert all(p.grad is None for p in model.vit.parameters())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vit = sum(p.numel() for p in model.vit.parameters())
    state = sum(s["exp_avg"].numel() for s in trainer.engine.optimizer.optimizer.state.values())
    assert trainable <= state < trainable + 64, (trainable, state)  # ZeRO pads its flat buffer
    assert vit > 0 and state + vit > trainable + vit - 64


def test_non_finite_losses_are_dropped_counted_and_the_run_goes_on(make_trainer):
    trainer = make_trainer(train={"steps": 3})
    real, calls = trainer.compute_loss, []

    def sometimes_nan(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    trainer.compute_loss = sometimes_nan
    assert trainer.run() == 0
    assert trainer.progress.bad_losses == 2 and trainer.progress.step == 3
    assert len(calls) == 3 * trainer.accum + 2  # the dropped ones were replaced


def test_too_many_bad_losses_in_a_row_stop_the_run(make_trainer):
    trainer = make_trainer(train={"steps": 3, "max_bad_losses_in_a_row": 3})
    trainer.compute_loss = lambda model, batch: torch.tensor(float("inf"), requires_grad=True)
    with pytest.raises(TrainingError, match="3 non-finite losses in a row at step 1"):
        trainer.run()


def test_out_of_memory_is_reported_with_what_to_change(make_trainer):
    trainer = make_trainer()

    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trainer.compute_loss = oom
    with pytest.raises(TrainingError, match="out of memory at step 1 with micro_batch_size=4"):
        trainer.run()


def test_the_training_data_pipeline_is_built_once_per_run(make_trainer, monkeypatch):
    """Start-up no longer consumes a batch to count FLOPs and rebuild the pipeline: one training
    pipeline per run; evaluation passes read their own held-out sources."""
    import pali3_train.data_pipeline.loader

    built = []
    real_init = pali3_train.data_pipeline.loader.DataPipeline.__init__

    def counting(self, *args, **kwargs):
        built.append(kwargs.get("mode", "train"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pali3_train.data_pipeline.loader.DataPipeline, "__init__", counting)
    trainer = make_trainer(train={"steps": 2})
    assert trainer.run() == 0
    assert built.count("train") == 1


def test_a_steps_metrics_split_tokens_and_separate_model_from_hardware_flops(
    make_trainer, monkeypatch
):
    """Visual tokens are every image's patches, text tokens the real prompt and target tokens;
    TFLOP/s and MFU count model FLOPs, HFU adds checkpointing's recompute (a peak of 1 TFLOP/s
    stands in for a known device)."""
    monkeypatch.setattr("pali3_train.engine.trainer.device_peak_flops", lambda *_: 1e12)
    trainer = make_trainer(parallel={"zero_stage": 2, "activation_checkpointing": True})
    real, seen = trainer.compute_loss, []

    def recording(model, batch):
        seen.append(batch)
        return real(model, batch)

    trainer.compute_loss = recording
    metrics = trainer.train_step(iter(trainer.data))
    seconds, flops = metrics["step_time_s"], trainer.flops_per_sample
    patches = trainer.cfg.model.vit.num_patches
    text = sum(int(b.prompt_mask.sum() + b.target_mask.sum()) for b in seen)
    assert metrics["visual_tokens_per_s"] * seconds == pytest.approx(8 * patches)
    assert metrics["text_tokens_per_s"] * seconds == pytest.approx(text)
    assert text < sum(b.prompt_mask.numel() + b.target_mask.numel() for b in seen)  # no padding
    samples_per_s = 8 / seconds  # one device
    assert metrics["tflops_per_device"] == pytest.approx(flops.model * samples_per_s / 1e12)
    assert metrics["mfu"] == pytest.approx(flops.model * samples_per_s / 1e12)
    assert metrics["hfu"] == pytest.approx((flops.model + flops.recompute) * samples_per_s / 1e12)
    assert metrics["hfu"] > metrics["mfu"] and metrics["memory_gib"] > 0
