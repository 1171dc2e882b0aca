"""What a run reports, on rank 0: its config, params and tags at the start; per-step metrics
(``metrics.jsonl``, the tracker, the progress bar); evaluations (``eval.jsonl``, the tracker, one
log line); the loss curve at the end. The trainer hands over numbers and never formats them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from pali3_train.config import Config, dump_config, flatten_config
from pali3_train.plots import plot_loss_curves
from pali3_train.tracking import Tracker

log = logging.getLogger(__name__)


class RunReport:
    """Writes nothing unless ``is_main``, so every rank may call it."""

    def __init__(self, cfg: Config, tracker: Tracker, is_main: bool, start_step: int = 0):
        self.cfg, self.tracker, self.is_main, self.start_step = cfg, tracker, is_main, start_step
        self.run_dir = Path(cfg.run_dir)
        self.bar: tqdm | None = None  # from the first step on

    def _progress_bar(self) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(
                total=self.cfg.train.steps,
                initial=self.start_step,
                unit="step",
                disable=not self.is_main,
                mininterval=1 if sys.stderr.isatty() else 30,
                dynamic_ncols=True,
            )
        return self.bar

    def start(self, tags: dict[str, str], resumed: bool) -> None:
        """The resolved config beside the run and in the tracker; params only for a new run
        (a resumed one has them)."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        if not resumed:
            self.tracker.log_params(flatten_config(self.cfg))
        self.tracker.set_tags({**tags, "git_commit": _git_commit()})
        self.tracker.log_artifact(self.run_dir / "config.yaml")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main or step % self.cfg.train.log_every_steps:
            return
        _append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, **metrics})
        self.tracker.log_metrics(metrics, step)
        bar = self._progress_bar()
        bar.set_postfix(_bar_fields(metrics), refresh=False)
        bar.update(step - bar.n)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if not metrics or not self.is_main:
            return
        _append_jsonl(self.run_dir / "eval.jsonl", {"step": step, **metrics})
        self.tracker.log_metrics(metrics, step)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
        log.info("eval at step %d: %s", step, shown)

    def finish(self, title: str) -> None:
        """The loss curve as ``loss.png``, beside the run and in the tracker."""
        if self.bar is not None:
            self.bar.close()
        if not self.is_main:
            return
        curve = self.run_dir / "loss.png"
        if plot_loss_curves({title: self.run_dir / "metrics.jsonl"}, curve):
            self.tracker.log_artifact(curve)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _git_commit() -> str:
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


def _bar_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step's metrics: loss, lr, throughput (samples and
    visual + text tokens per second), the step's peak memory, and MFU where the device's peak
    is known."""
    fields = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
              "samples_s": f"{metrics['samples_per_s']:.0f}"}  # fmt: skip
    tokens = metrics.get("visual_tokens_per_s", 0.0) + metrics.get("text_tokens_per_s", 0.0)
    if tokens:
        fields["tokens_s"] = f"{tokens:,.0f}"
    if "memory_gib" in metrics:
        fields["mem_gib"] = f"{metrics['memory_gib']:.1f}"
    if "mfu" in metrics:
        fields["mfu"] = f"{metrics['mfu']:.1%}"
    return fields
