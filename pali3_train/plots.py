"""Loss curves as PNG: what people would rather look at than read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path) -> None:
    """One panel per curve, ``{name: (steps, values)}``, log-scaled values, three per row."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CPU boxes, CI and cluster nodes
    import matplotlib.pyplot as plt

    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.axis("off")
    for ax, (name, (steps, values)) in zip(axes.flat, curves.items()):
        ax.plot(list(steps), list(values))
        ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(path: Path) -> dict[int, dict]:
    """metrics.jsonl -> {step: metrics}; a resumed run appends, so the last line of a step wins."""
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["step"]: row for row in rows}


def plot_loss_curves(runs: dict[str, Path], out: Path) -> bool:
    """One panel per run, ``{title: its metrics.jsonl}``; runs without metrics are left out.
    False when none has any."""
    curves = {}
    for title, metrics in runs.items():
        rows = read_metrics(metrics)
        if rows:
            steps = sorted(rows)
            curves[title] = (steps, [rows[s]["loss"] for s in steps])
    if curves:
        plot_curves(curves, out)
    return bool(curves)
