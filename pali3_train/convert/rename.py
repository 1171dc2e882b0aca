"""Bidirectional key renaming between HuggingFace and pali3-train state dicts.

A conversion is a table of (HF pattern, our pattern) pairs in which ``{i}`` stands for a layer
index. The same table serves import and export, so a round trip is lossless by construction, and
any key no rule matches is an error rather than a silently dropped weight.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

Rules = Sequence[tuple[str, str]]
StateDict = dict[str, torch.Tensor]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def rename(state: Mapping[str, torch.Tensor], rules: Rules, *, to_hf: bool) -> StateDict:
    """Rename every key by the first matching rule (HF -> ours, or ours -> HF with ``to_hf``)."""
    source, target = (1, 0) if to_hf else (0, 1)
    compiled = [(_compile(rule[source]), rule[target]) for rule in rules]
    out: StateDict = {}
    unmatched = []
    for key, value in state.items():
        for regex, template in compiled:
            match = regex.match(key)
            if match:
                out[template.replace("{i}", match.groupdict().get("i") or "")] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyError(
            f"no conversion rule for {len(unmatched)} key(s): {', '.join(unmatched[:8])}"
        )
    return out


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys under ``prefix`` with it removed (published two-tower checkpoints nest each tower)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state.items()}
