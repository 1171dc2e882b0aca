"""The training loop of one stage: build -> restore -> loop {data, forward, backward, step, log,
evaluate on schedule, checkpoint} -> export.

What the stage trains, on which loss, with which extra metrics and evaluators comes from its
spec (``pali3_train.stages``); building the model and DeepSpeed is ``engine.build``, reporting is
``engine.reporting``, checkpoints and exports are ``engine.checkpoint`` and ``engine.export``.
Every rank runs the same code and takes the same path at every decision (a dropped micro-batch,
a save, a stop), each decided collectively, because DeepSpeed's ZeRO-3 deadlocks otherwise.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from pali3_train.config import Config, to_dict
from pali3_train.data_pipeline.loader import DataPipeline
from pali3_train.engine import checkpoint
from pali3_train.engine.build import build_model, make_engine
from pali3_train.engine.checkpoint import CheckpointMeta
from pali3_train.engine.deepspeed_config import accumulation_steps
from pali3_train.engine.device_guard import device_guard
from pali3_train.engine.distributed import DistEnv, all_ranks_agree
from pali3_train.engine.export import export_final
from pali3_train.engine.peak import device_peak_flops
from pali3_train.engine.reporting import RunReport
from pali3_train.engine.step_memory import peak_memory_gib, reset_peak_memory
from pali3_train.eval.evaluator import EvalContext, evaluate
from pali3_train.parallel import ParallelDims, dp_group, dp_rank, dp_size, tp_rank
from pali3_train.precision import compute_dtype
from pali3_train.stages.registry import spec_for
from pali3_train.tokenizer import Tokenizer
from pali3_train.tracking import open_tracker, run_name

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PREEMPTED, EXIT_FAILED = 0, 75, 1  # 75 = EX_TEMPFAIL: saved, requeue me


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad losses, out of memory); the message says why."""


@dataclass
class Progress:
    """What a checkpoint needs beyond DeepSpeed's and the data pipeline's state."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # samples consumed, all ranks
    bad_losses: int = 0  # micro-batches dropped for a NaN/inf loss, all time
    mlflow_run_id: str | None = None
    bad_in_a_row: int = field(default=0, repr=False)


class Trainer:
    """One stage's run on this rank. Owns the DeepSpeed engine, the training data (built once),
    the stage's evaluators, the tracker and the progress counters; restores all of them from a
    checkpoint (``resume``: auto | none | a folder; its files are verified first, and read
    without unpickling code unless ``trust_checkpoint``) and saves them."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        device: torch.device,
        dims: ParallelDims,
        resume: str = "auto",
        trust_checkpoint: bool = False,
    ):
        self.cfg, self.env, self.device, self.dims = cfg, env, device, dims
        self.spec = spec_for(cfg)
        self.compute_loss = self.spec.loss
        self.ckpt_root = Path(cfg.checkpoint_dir)
        self.accum = accumulation_steps(cfg, dims.dp)
        self.flops_per_sample = self.spec.flops(cfg)
        self.stop_requested = False
        self.guard = device_guard(device)  # PALI3_DEVICE_GUARD=1: device bugs fail on CPU too

        self.trusted = trust_checkpoint
        restored = checkpoint.resolve(resume, self.ckpt_root, checkpoint.verify_on_all_ranks)
        meta = checkpoint.read_meta(restored) if restored is not None else None
        reshard = meta is not None and meta.world_size != env.world_size
        if reshard:  # before the engine exists: its config says which format it loads
            checkpoint.convert_to_universal(restored, self.trusted)
        self.engine = make_engine(
            cfg, build_model(cfg, dims).to(device), dims, checkpoint.load_options(reshard)
        )
        self.data = self._pipeline()
        self.progress = self._restore(restored, reshard) if restored is not None else Progress()
        self._saved_step = self.progress.step if restored is not None else -1

        tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
        context = EvalContext(tokenizer, device, compute_dtype(cfg.train.precision), dp_rank(),
                              dp_size(), dp_group(), env.is_main)  # fmt: skip
        self.evaluators = self.spec.evaluators(cfg, context)
        tracking = replace(cfg.tracking, run_name=cfg.tracking.run_name or run_name(cfg))
        self.tracker = open_tracker(
            tracking, Path(cfg.run_dir), is_main=env.is_main, run_id=self.progress.mlflow_run_id
        )
        self.progress.mlflow_run_id = self.tracker.run_id
        self.report = RunReport(cfg, self.tracker, env.is_main, self.progress.step)
        self.report.start(self._tags(), resumed=restored is not None)

    def _pipeline(self) -> DataPipeline:
        cfg = self.cfg
        return DataPipeline(cfg.data, image_size_px=cfg.model.vit.image_size_px,
                            seed=cfg.train.seed, batch_size=cfg.train.micro_batch_size,
                            dp_rank=dp_rank(), dp_size=dp_size(), device=self.device,
                            image_dtype=compute_dtype(cfg.train.precision),
                            served_keys_path=self._served_keys_path())  # fmt: skip

    def _served_keys_path(self) -> Path | None:
        """``data.log_served_keys``: one file per data-parallel rank, written by its TP rank 0."""
        if not self.cfg.data.log_served_keys or tp_rank() != 0:
            return None
        folder = Path(self.cfg.run_dir) / "served_keys"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"dp{dp_rank():05d}.jsonl"

    def _restore(self, path: Path, reshard: bool) -> Progress:
        meta, rank_state = checkpoint.load(self.engine, path, reshard, self.trusted)
        if rank_state is not None and self.data.resumes_exactly(rank_state["data"]):
            self.data.load_state_dict(rank_state["data"])
        else:  # another data layout: the old ranks' data states, re-partitioned
            ranks = checkpoint.read_rank_states(path)
            self.data.load_elastic([r["data"] for r in ranks], meta.step)
            if self.env.is_main:
                log.warning(
                    "resumed %s (%d ranks) on %d ranks x %d data workers: the epoch's remaining "
                    "data re-partitioned over them (data_pipeline.elastic)",
                    path, meta.world_size, self.env.world_size, self.cfg.data.num_workers,
                )  # fmt: skip
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, meta.step)
        return Progress(meta.step, meta.samples, meta.bad_losses, meta.mlflow_run_id)

    def _tags(self) -> dict[str, str]:
        return {
            "stage": self.cfg.stage.name or self.spec.objective,
            "objective": self.spec.objective,
            "world_size": str(self.env.world_size),
            "tensor_parallel": str(self.dims.tp),
        }

    # --------------------------------------------------------------------------------- loop

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)
        batches, every = iter(self.data), self.cfg.eval.every_steps
        status = "FINISHED"
        try:
            while self.progress.step < self.cfg.train.steps:
                metrics = self.train_step(batches)
                self.report.step(self.progress.step, metrics)
                if every and self.progress.step % every == 0:
                    self.report.evaluation(self.progress.step, self.evaluate())
                if self.progress.step % self.cfg.checkpoint.every_steps == 0:
                    self.save()
                if all_ranks_agree(self.stop_requested, self.device):
                    self.save()
                    status = "KILLED"
                    return EXIT_PREEMPTED
            self.save()  # the final state, unless the last step already saved it
            if not (every and self.progress.step % every == 0):  # not just evaluated
                self.report.evaluation(self.progress.step, self.evaluate())
            if self.cfg.checkpoint.export_final:
                self.export_weights()
            return EXIT_OK
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.report.finish(f"stage {self.cfg.stage.name or self.spec.objective}")
            self.tracker.close(status)

    def _request_stop(self, signum: int, frame) -> None:
        self.stop_requested = True  # acted on after the current step, on every rank at once

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: ``accum`` micro-batches with a finite loss on every rank."""
        reset_peak_memory(self.device)
        start, losses, tokens, good = time.perf_counter(), [], Counter(), 0
        lr = self.engine.get_lr()[0]  # the scheduler moves on at the step's last micro-batch
        while good < self.accum:
            batch = next(batches)
            loss = self._forward_backward(batch)
            if loss is None:
                continue
            losses.append(loss)
            tokens.update(self.spec.batch_tokens(self.cfg, batch))
            good += 1
        self.progress.bad_in_a_row = 0
        self.progress.step += 1
        self.progress.samples += self.cfg.train.global_batch_size
        seconds = time.perf_counter() - start
        with self.guard:
            return self._step_metrics(torch.stack(losses).mean(), tokens, lr, seconds)

    def _forward_backward(self, batch) -> torch.Tensor | None:
        """One micro-batch: its detached loss, or None when some rank's loss is not finite (then
        no rank steps)."""
        with self.guard:
            try:
                loss = self.compute_loss(self.engine, batch)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(self._oom_message(exc)) from None
            if all_ranks_agree(not torch.isfinite(loss).item(), self.device):
                self._drop_bad_loss()
                return None
            self.engine.backward(loss)
            self.engine.step()
            return loss.detach()

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
        self, loss: torch.Tensor, tokens: Counter, lr: float, seconds: float
    ) -> dict[str, float]:
        """The step's metrics. ``memory_gib``: this step's peak on this rank (``step_memory``);
        ``tflops_per_device`` and ``mfu``: model FLOPs, ``hfu``: hardware FLOPs, which add
        activation checkpointing's recompute (``engine.flops``); MFU and HFU only on a device
        whose peak is known (``engine.peak``)."""
        quality = self.data.quality_counts()  # the same keys on every rank
        own_data = float(tp_rank() == 0)  # a TP group's ranks share one data share: count it once
        counts = [float(tokens["visual"]), float(tokens["text"])]
        counts += [own_data * count for count in quality.values()]
        counts = torch.tensor(counts, dtype=torch.float64, device=self.device)  # exact > 2^24
        stats = torch.cat([loss.double().reshape(1), counts])
        dist.all_reduce(stats)  # world: loss mean; tokens sum (TP peers twice); data counts sum
        summed = stats.tolist()
        world, batch = self.env.world_size, self.cfg.train.global_batch_size
        per_device = batch / seconds / world  # samples per second
        flops, checkpointing = self.flops_per_sample, self.cfg.parallel.activation_checkpointing
        metrics = {
            "loss": summed[0] / world,
            "lr": lr,
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "samples_per_s": batch / seconds,
            "visual_tokens_per_s": summed[1] / self.dims.tp / seconds,
            "text_tokens_per_s": summed[2] / self.dims.tp / seconds,
            "step_time_s": seconds,
            **peak_memory_gib(self.device),
            "tflops_per_device": flops.model * per_device / 1e12,
            "bad_losses": float(self.progress.bad_losses),
            **dict(zip(quality, summed[3:])),  # since the run began, over data-parallel ranks
        }
        peak = device_peak_flops(self.device, self.cfg.train.precision)
        if peak:
            metrics["mfu"] = flops.model * per_device / peak
            metrics["hfu"] = flops.hardware(checkpointing) * per_device / peak
        return metrics | self.spec.step_metrics(self.engine.module, self.cfg, seconds)

    # ------------------------------------------------------------- evaluation, export, saving

    def evaluate(self) -> dict[str, float]:
        """Every evaluator of the stage on the model as it is: ``eval/<source>/<metric>``."""
        with self.guard:
            return evaluate(self.evaluators, self.engine.module)

    def evaluate_only(self) -> int:
        """Evaluate the model as built or restored, without training (an untrained baseline, or
        a checkpoint scored on other held-out data)."""
        try:
            self.report.evaluation(self.progress.step, self.evaluate())
        finally:
            self.tracker.close("FINISHED")
        return EXIT_OK

    def export_weights(self) -> None:
        with self.guard:
            out = export_final(self.engine, self.cfg, self.progress.step)
        if self.env.is_main:
            self.tracker.set_tags({"exported_weights": str(out.resolve())})
            log.info("exported step %d to %s", self.progress.step, out)

    def save(self) -> None:
        if self.progress.step == self._saved_step:
            return
        self._saved_step = self.progress.step
        meta = CheckpointMeta(
            step=self.progress.step,
            samples=self.progress.samples,
            bad_losses=self.progress.bad_losses,
            mlflow_run_id=self.tracker.run_id,  # may change once an offline server returns
            world_size=self.env.world_size,
            config=to_dict(self.cfg),
        )
        rank_state = {"rng": checkpoint.rng_state(), "data": self.data.state_dict()}
        with self.guard:
            checkpoint.save(
                self.engine, self.ckpt_root, meta, rank_state, self.cfg.checkpoint.keep_last
            )
