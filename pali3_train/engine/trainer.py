"""The training loop: build -> parallelize -> DeepSpeed -> loop {data, forward, backward, step,
log, checkpoint}.

One loop serves every stage; what differs is data (the config's mixture), which model the stage
trains and what is frozen (``stage`` section), and the objective (``OBJECTIVES``). Every rank runs
the same code and takes the same path at every decision (a dropped micro-batch, a save, a stop),
each decided collectively, because DeepSpeed's ZeRO-3 deadlocks otherwise.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data_pipeline.loader import DataPipeline
from data_pipeline.transforms import Batch, normalize_images
from pali3_train.config import Config, SourceConfig, dump_config, to_dict
from pali3_train.convert.rename import add_prefix, strip_prefix
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.engine import checkpoint
from pali3_train.engine.deepspeed_config import accumulation_steps, deepspeed_config
from pali3_train.engine.distributed import DistEnv, all_ranks_agree
from pali3_train.engine.export import export, save_export
from pali3_train.engine.optim import freeze, make_optimizer, make_scheduler
from pali3_train.engine.tracking import flatten_config, open_tracker
from pali3_train.eval.retrieval import recall_at_k
from pali3_train.eval.scoring import score_answers
from pali3_train.eval.zero_shot import zero_shot_accuracy
from pali3_train.generate import generate_answers
from pali3_train.losses.siglip_ring import ring_sigmoid_loss
from pali3_train.models import PaLI3, SigLIP
from pali3_train.models.vit import VisionTransformer, resample_posemb
from pali3_train.parallel import (
    DeepSpeedMPU,
    ParallelDims,
    apply_activation_checkpointing,
    dp_group,
    dp_rank,
    dp_size,
    full_state_dict,
    parallelize,
)
from pali3_train.plots import plot_loss_curves
from pali3_train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PREEMPTED, EXIT_FAILED = 0, 75, 1  # 75 = EX_TEMPFAIL: saved, requeue me
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per device


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad losses, out of memory); the message says why."""


# ------------------------------------------------------------------------------ what a stage is


def _pali3_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    images = normalize_images(batch.images, next(model.parameters()).dtype)
    return model(images, batch.prompt, batch.prompt_mask, batch.target, batch.target_mask).loss


class ContrastiveSigLIP(SigLIP):
    """Stage 0's model: SigLIP whose forward returns the sigmoid loss of every image of the
    data-parallel batch against every text, chunked around the data-parallel ring
    (tensor-parallel peers hold the same pairs and stay out of it). The loss is computed inside
    forward so that ZeRO-3 gathers the temperature and bias like every other weight; the state
    dict is SigLIP's."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image_emb, text_emb = self.embed_images(images), self.embed_texts(tokens)
        return ring_sigmoid_loss(
            image_emb, text_emb, self.logit_scale, self.logit_bias, group=dp_group()
        )


def _siglip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(normalize_images(batch.images, next(model.parameters()).dtype), batch.target)


Objective = Callable[[nn.Module, Batch], torch.Tensor]
OBJECTIVES: dict[str, tuple[type[nn.Module], Objective]] = {
    "0": (ContrastiveSigLIP, _siglip_loss),
    "1": (PaLI3, _pali3_loss),
    "2": (PaLI3, _pali3_loss),
    "transfer": (PaLI3, _pali3_loss),
}


def build_model(cfg: Config, stage: str, dims: ParallelDims) -> nn.Module:
    """The stage's model, whole on every rank (same seed), with the previous stage's weights,
    frozen parts, then tensor parallelism and activation checkpointing applied from outside."""
    torch.manual_seed(cfg.train.seed)
    model = OBJECTIVES[stage][0](cfg.model)
    if cfg.stage.init_from:
        _load_init(model, cfg.stage.init_from)
    freeze(model, cfg.stage.freeze)
    model = parallelize(model, dims)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def _load_init(model: nn.Module, path: str) -> None:
    """Weights exported by an earlier stage. A SigLIP file (stage 0) gives PaLI-3 its ViT: the
    image tower; its MAP head and text tower have no place in PaLI-3."""
    state = load_weights(path)
    if isinstance(model, PaLI3) and read_metadata(path).get("kind") == "siglip":
        state = add_prefix(strip_prefix(state, "image."), "vit.")
    _resample_position_embeddings(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise TrainingError(
            f"stage.init_from: {path} has weights this model lacks: {sorted(unexpected)[:5]}"
        )
    if missing:
        log.info(
            "stage.init_from: %d tensors keep their initialisation: %s",
            len(missing),
            sorted(missing)[:8],
        )


def _resample_position_embeddings(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Stage 2 raises the resolution: a ViT whose patch grid grew keeps its learned position
    embeddings, resampled to the new grid (in place in ``state``)."""
    for name, vit in model.named_modules():
        key = f"{name}.pos_embed"
        if isinstance(vit, VisionTransformer) and key in state:
            if state[key].shape != vit.pos_embed.shape:
                log.info("stage.init_from: %s resampled from %d to %d patches",
                         key, state[key].shape[0], vit.cfg.num_patches)  # fmt: skip
                state[key] = resample_posemb(state[key], vit.cfg.grid_size)


def make_engine(cfg: Config, model: nn.Module, dims: ParallelDims, extra: dict | None = None):
    """DeepSpeed around ``model``: AdamW over its trainable parameters, the schedule, ZeRO over
    the data-parallel group only (the mpu adapter), the JSON generated from ``cfg``."""
    optimizer = make_optimizer(model, cfg.train)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, cfg.train),
        config=deepspeed_config(cfg, dims.dp) | (extra or {}),
        mpu=DeepSpeedMPU(),
        dist_init_required=False,
    )
    return engine


# --------------------------------------------------------------------------------- the trainer


@dataclass
class Progress:
    """What a checkpoint needs beyond DeepSpeed's and the data pipeline's state."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # samples consumed, all ranks
    bad_losses: int = 0  # micro-batches dropped for a NaN/inf loss, all time
    mlflow_run_id: str | None = None
    bad_in_a_row: int = field(default=0, repr=False)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        stage: str,
        env: DistEnv,
        device: torch.device,
        dims: ParallelDims,
        resume: str = "auto",
    ):
        self.cfg, self.stage, self.env, self.device, self.dims = cfg, stage, env, device, dims
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = Path(cfg.checkpoint_dir)
        self.accum = accumulation_steps(cfg, dims.dp)
        self.objective = OBJECTIVES[stage][1]
        self.tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
        self.progress = Progress()
        self.stop_requested = False

        restored = checkpoint.resolve(resume, self.ckpt_root)
        reshard = restored is not None and checkpoint.saved_world_size(restored) != env.world_size
        if reshard:
            checkpoint.convert_to_universal(restored)  # before the engine exists: its config says
        model = build_model(cfg, stage, dims).to(device)
        self.data = DataPipeline(cfg, dp_rank(), dp_size(), cfg.train.micro_batch_size)
        self.flops_per_micro_batch = self._count_flops(model)
        self.engine = make_engine(cfg, model, dims, checkpoint.load_options(reshard))
        if restored is not None:
            self._restore(restored, reshard)
        self._saved_step = self.progress.step if restored is not None else -1
        self.tracker = open_tracker(
            cfg.tracking, self.run_dir, is_main=env.is_main, run_id=self.progress.mlflow_run_id
        )
        self.progress.mlflow_run_id = self.tracker.run_id
        if env.is_main:
            self._start_tracking(restored)

    # ------------------------------------------------------------------------------ start-up

    def _count_flops(self, model: nn.Module) -> float:
        """FLOPs of one micro-batch's forward and backward on this rank, counted by running one
        (frozen parts cost no weight gradients, and the counter sees that)."""
        batch = next(iter(self.data)).to(self.device)
        with FlopCounterMode(display=False) as counter:
            self.objective(model, batch).backward()
        model.zero_grad(set_to_none=True)
        self.data = DataPipeline(self.cfg, dp_rank(), dp_size(), self.cfg.train.micro_batch_size)
        return float(counter.get_total_flops())

    def _restore(self, path: Path, reshard: bool) -> None:
        meta, rank_state = checkpoint.load(self.engine, path, reshard)
        self.progress = Progress(
            meta["step"], meta["samples"], meta["bad_losses"], meta["mlflow_run_id"]
        )
        if reshard:
            # Data and RNG states belong to the old layout's ranks: start a fresh, step-seeded
            # stream rather than replay the data from the beginning.
            cfg = replace(
                self.cfg, train=replace(self.cfg.train, seed=self.cfg.train.seed + meta["step"])
            )
            self.data = DataPipeline(cfg, dp_rank(), dp_size(), cfg.train.micro_batch_size)
            log.warning(
                "resharded %s from %d to %d ranks: model and optimizer state restored, "
                "the data order restarts",
                path,
                meta["world_size"],
                self.env.world_size,
            )
        else:
            self.data.load_state_dict(rank_state["data"])
            checkpoint.set_rng_state(rank_state["rng"])
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, self.progress.step)

    def _start_tracking(self, restored: Path | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        if restored is None:
            self.tracker.log_params(flatten_config(self.cfg))
        self.tracker.set_tags(
            {
                "stage": self.stage,
                "world_size": str(self.env.world_size),
                "tensor_parallel": str(self.dims.tp),
                "git_commit": _git_commit(),
            }
        )
        self.tracker.log_artifact(self.run_dir / "config.yaml")

    # --------------------------------------------------------------------------------- loop

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)
        batches, every = iter(self.data), self.cfg.eval.every_steps
        bar = tqdm(
            total=self.cfg.train.steps,
            initial=self.progress.step,
            unit="step",
            disable=not self.env.is_main,
            mininterval=1 if sys.stderr.isatty() else 30,
            dynamic_ncols=True,
        )
        status = "FINISHED"
        try:
            while self.progress.step < self.cfg.train.steps:
                metrics = self.train_step(batches)
                self._log(metrics, bar)
                if every and self.progress.step % every == 0:
                    self._log_eval(self.evaluate())
                if self.progress.step % self.cfg.checkpoint.every_steps == 0:
                    self.save()
                if all_ranks_agree(self.stop_requested, self.device):
                    self.save()
                    status = "KILLED"
                    return EXIT_PREEMPTED
            self.save()  # the final state, unless the last step already saved it
            if not (every and self.progress.step % every == 0):  # not just evaluated
                self._log_eval(self.evaluate())
            if self.cfg.checkpoint.export_final:
                self.export_weights()
            return EXIT_OK
        except BaseException:
            status = "FAILED"
            raise
        finally:
            bar.close()
            if self.env.is_main:
                self._finish_tracking()
            self.tracker.close(status)

    def _request_stop(self, signum: int, frame) -> None:
        self.stop_requested = True  # acted on after the current step, on every rank at once

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: ``accum`` micro-batches with a finite loss on every rank."""
        start, losses, tokens, good = time.perf_counter(), [], 0, 0
        lr = self.engine.get_lr()[0]  # the scheduler moves on at the step's last micro-batch
        while good < self.accum:
            batch = next(batches).to(self.device)
            try:
                loss = self.objective(self.engine, batch)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(self._oom_message(exc)) from None
            if all_ranks_agree(not torch.isfinite(loss).item(), self.device):
                self._drop_bad_loss()
                continue
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            tokens += int(batch.prompt_mask.sum() + batch.target_mask.sum())
            good += 1
        self.progress.bad_in_a_row = 0
        self.progress.step += 1
        self.progress.samples += self.cfg.train.global_batch_size
        seconds = time.perf_counter() - start
        return self._step_metrics(torch.stack(losses).mean(), tokens, lr, seconds)

    def _drop_bad_loss(self) -> None:
        self.progress.bad_losses += 1
        self.progress.bad_in_a_row += 1
        log.warning(
            "step %d: non-finite loss, micro-batch dropped (%d in a row)",
            self.progress.step + 1,
            self.progress.bad_in_a_row,
        )
        if self.progress.bad_in_a_row >= self.cfg.train.max_bad_losses_in_a_row:
            raise TrainingError(
                f"{self.progress.bad_in_a_row} non-finite losses in a row at step "
                f"{self.progress.step + 1} (train.max_bad_losses_in_a_row): lower train.lr or "
                "check the data"
            )

    def _oom_message(self, exc: Exception) -> str:
        return (
            f"out of memory at step {self.progress.step + 1} with micro_batch_size="
            f"{self.cfg.train.micro_batch_size} ({exc}); lower train.micro_batch_size (the "
            "accumulation grows to keep the global batch), or set "
            "parallel.activation_checkpointing: true or a higher parallel.zero_stage"
        )

    def _step_metrics(
        self, loss: torch.Tensor, tokens: int, lr: float, seconds: float
    ) -> dict[str, float]:
        stats = torch.stack([loss.float(), torch.tensor(float(tokens))]).to(self.device)
        dist.all_reduce(stats)  # loss: mean over ranks; tokens: sum (TP peers count twice)
        world = self.env.world_size
        flops = self.flops_per_micro_batch * self.accum * world / seconds
        metrics = {
            "loss": stats[0].item() / world,
            "lr": lr,
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "samples_per_s": self.cfg.train.global_batch_size / seconds,
            "tokens_per_s": stats[1].item() / self.dims.tp / seconds,
            "step_time_s": seconds,
            "memory_gib": _peak_memory_gib(self.device),
            "tflops_per_device": flops / world / 1e12,
            "bad_losses": float(self.progress.bad_losses),
        }
        peak = _peak_flops(self.device)
        if peak:
            metrics["mfu"] = flops / (peak * world)
        if self.stage == "0":
            siglip = self.engine.module
            metrics["temperature"] = siglip.logit_scale.exp().item()
            metrics["bias"] = siglip.logit_bias.item()
            metrics["pairs_per_s"] = self.cfg.train.global_batch_size**2 / seconds
        return metrics

    # -------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of every ``eval.sources`` entry. Stage 0: retrieval recall and
        zero-shot accuracy; later stages: generated answers scored by their task."""
        if not self.cfg.eval.sources:
            return {}
        metrics = {}
        for source in self.cfg.eval.sources:
            score = self._score_embeddings if self.stage == "0" else self._score_answers
            found = score(source)
            metrics |= {f"eval/{source.name}/{k}": v for k, v in found.items()}
        return metrics

    def _held_out(self, source: SourceConfig, batch_size: int) -> Iterator[Batch]:
        """One pass over an eval source, read whole by every rank, capped at eval.max_samples."""
        data = replace(self.cfg.data, sources=(source,), num_workers=0)
        pipeline = DataPipeline(replace(self.cfg, data=data), 0, 1, batch_size, mode="epoch")
        seen = 0
        for batch in pipeline:
            batch = batch.rows(0, self.cfg.eval.max_samples - seen)
            seen += len(batch)
            yield batch.to(self.device)
            if seen >= self.cfg.eval.max_samples:
                return

    def _score_embeddings(self, source: SourceConfig) -> dict[str, float]:
        """Every rank embeds the same samples (ZeRO-3 and TP need all ranks in each forward)."""
        siglip, images, texts, captions = self.engine.module, [], [], []
        for batch in self._held_out(source, self.cfg.train.micro_batch_size):
            pixels = normalize_images(batch.images, next(siglip.parameters()).dtype)
            images.append(siglip.embed_images(pixels))
            texts.append(siglip.embed_texts(batch.target))
            captions += self.tokenizer.batch_decode(batch.target)
        image_emb, text_emb = torch.cat(images), torch.cat(texts)
        metrics = recall_at_k(image_emb, text_emb)
        for task in (t for t in self.cfg.eval.zero_shot if t.source == source.name):
            result = zero_shot_accuracy(image_emb, captions, task.classes, task.template,
                                        self._embed_prompts)  # fmt: skip
            metrics["zero_shot_accuracy"] = result["accuracy"]
            metrics["zero_shot_chance"] = result["chance"]
        return metrics

    def _score_answers(self, source: SourceConfig) -> dict[str, float]:
        """Each data-parallel rank answers its share of every held-out batch; a rank whose share
        is empty decodes a stand-in and drops it, and decoding stops when every rank is done,
        so all ranks run the same forwards (ZeRO-3 gathers weights in each)."""
        share, rank, opts = self.cfg.eval.batch_size, dp_rank(), self.cfg.eval
        answers, references = [], []
        for batch in self._held_out(source, share * dp_size()):
            part = batch.rows(rank * share, (rank + 1) * share)
            texts = generate_answers(self.engine.module, self.tokenizer,
                                     part if len(part) else batch.rows(0, 1),
                                     opts.max_decode_tokens, opts.beam_size,
                                     self._all_ranks_finished)  # fmt: skip
            if len(part):
                answers += texts
                references += self.tokenizer.batch_decode(part.target)
        shares: list = [None] * dp_size()
        dist.all_gather_object(shares, (answers, references), group=dp_group())
        answers = [a for share_answers, _ in shares for a in share_answers]
        references = [[r] for _, share_refs in shares for r in share_refs]
        if self.env.is_main:
            self._show_examples(source.name, answers, references)
        return score_answers(source.task, answers, references) | {"samples": float(len(answers))}

    def _all_ranks_finished(self, finished: torch.Tensor) -> bool:
        return not all_ranks_agree(not bool(finished.all()), self.device)

    def _show_examples(self, name: str, answers: list[str], references: list[list[str]]) -> None:
        for answer, (reference,) in list(zip(answers, references))[:3]:
            log.info("eval %s: %r (reference %r)", name, answer, reference)

    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens, _ = self.tokenizer.batch_encode(prompts, self.cfg.data.max_target_tokens)
        return self.engine.module.embed_texts(tokens.to(self.device))

    def _log_eval(self, metrics: dict[str, float]) -> None:
        if not metrics or not self.env.is_main:
            return
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.progress.step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, self.progress.step)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
        log.info("eval at step %d: %s", self.progress.step, shown)

    # --------------------------------------------------------------------------- reporting

    def _log(self, metrics: dict[str, float], bar: tqdm) -> None:
        step = self.progress.step
        if not self.env.is_main or step % self.cfg.train.log_every_steps:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, step)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            samples_s=f"{metrics['samples_per_s']:.0f}",
            refresh=False,
        )
        bar.update(step - bar.n)

    def _finish_tracking(self) -> None:
        curve = self.run_dir / "loss.png"
        if plot_loss_curves({f"stage {self.stage}": self.run_dir / "metrics.jsonl"}, curve):
            self.tracker.log_artifact(curve)

    def evaluate_only(self) -> int:
        """Evaluate the model as built or restored, without training (an untrained baseline, or
        a checkpoint scored on other held-out data)."""
        try:
            self._log_eval(self.evaluate())
        finally:
            self.tracker.close("FINISHED")
        return EXIT_OK

    def export_weights(self) -> None:
        """The final weights as <run_dir>/model.safetensors, which the next stage's
        ``stage.init_from`` names. Without tensor parallelism they are consolidated from the
        last checkpoint (fp32 master weights under ZeRO); with it, the live shards are gathered
        (the module's weights, in training precision)."""
        out = self.run_dir / "model.safetensors"
        if self.dims.tp > 1:
            state = self._gather_weights()
            if self.env.is_main:
                save_export(state, out, self.stage, to_dict(self.cfg), self.progress.step)
        elif self.env.is_main:
            export(checkpoint.find_latest(self.ckpt_root), out)
        if self.env.is_main:
            self.tracker.set_tags({"exported_weights": str(out.resolve())})
            log.info("exported step %d to %s", self.progress.step, out)
        dist.barrier()

    def _gather_weights(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        if self.cfg.parallel.zero_stage < 3:
            return full_state_dict(module)
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return full_state_dict(module)

    def save(self) -> None:
        if self.progress.step == self._saved_step:
            return
        self._saved_step = self.progress.step
        meta = {
            "samples": self.progress.samples,
            "bad_losses": self.progress.bad_losses,
            "mlflow_run_id": self.tracker.run_id,  # may change once an offline server returns
            "stage": self.stage,
            "config": to_dict(self.cfg),
        }
        rank_state = {"rng": checkpoint.rng_state(), "data": self.data.state_dict()}
        checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.progress.step,
            meta,
            rank_state,
            self.cfg.checkpoint.keep_last,
        )


# ------------------------------------------------------------------------------------ helpers


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
