"""Counting what a data worker served and skipped, and stopping when the data has gone bad.

A training run must survive the odd corrupt sample but not silently train on a corpus that is
mostly broken: each skip is logged with its shard and key, counted by source and reason, and
once too large a share of what a worker read was unusable the run stops, naming the shard that
contributed most so that it can be inspected or removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_image",
    "corrupt_video",
    "invalid_json",
    "invalid_text",
    "missing_field",
    "unreadable_shard",
)


class DataQualityError(RuntimeError):
    """Too many samples were unusable; the message names the worst shard."""


@dataclass
class Health:
    """Counters of one worker; plain dicts so that they travel in batches and checkpoints."""

    served: Counter = field(default_factory=Counter)  # source -> samples served
    skipped: Counter = field(default_factory=Counter)  # "source/reason" -> samples skipped
    skipped_by_shard: Counter = field(default_factory=Counter)  # url -> samples skipped

    def record_served(self, source: str) -> None:
        self.served[source] += 1

    def record_skip(self, source: str, reason: str, url: str, key: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.skipped[f"{source}/{reason}"] += 1
        self.skipped_by_shard[url] += 1
        log.warning("skipped sample %r of %s (source %s): %s: %s", key, url, source, reason, detail)

    def check(self, max_fraction: float, min_samples: int) -> None:
        skipped = sum(self.skipped.values())
        seen = skipped + sum(self.served.values())
        if seen < min_samples or skipped <= max_fraction * seen:
            return
        url, count = self.skipped_by_shard.most_common(1)[0]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        raise DataQualityError(
            f"{skipped} of {seen} samples read were unusable ({skipped / seen:.1%} > "
            f"data.max_skip_fraction={max_fraction}); worst shard {url} with {count} skips "
            f"[{reasons}]"
        )

    def state_dict(self) -> dict:
        return {
            "served": dict(self.served),
            "skipped": dict(self.skipped),
            "skipped_by_shard": dict(self.skipped_by_shard),
        }

    def load_state_dict(self, state: dict) -> None:
        self.served = Counter(state["served"])
        self.skipped = Counter(state["skipped"])
        self.skipped_by_shard = Counter(state["skipped_by_shard"])


def total(healths: list[dict]) -> Health:
    """Sum the counters of several workers' ``state_dict()``s."""
    out = Health()
    for state in healths:
        part = Health()
        part.load_state_dict(state)
        out.served.update(part.served)
        out.skipped.update(part.skipped)
        out.skipped_by_shard.update(part.skipped_by_shard)
    return out
