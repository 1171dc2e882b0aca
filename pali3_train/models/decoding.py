"""Batched beam search for the UL2 decoder; greedy decoding is beam search with one beam.

Each step scores every continuation of every live hypothesis and keeps the ``beam_size`` best per
example. Finished hypotheses (ended by EOS) stay in the beam with a frozen score, extended by PAD,
so that a short, likely answer competes fairly with longer ones. With ``use_cache`` the decoder
consumes one new token per step against its key/value cache; without it, the whole prefix is
decoded again (slower, and the reference the cache is tested against).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from pali3_train.models.ul2 import UL2


class Decoded(NamedTuple):
    tokens: torch.Tensor  # [B, T], T <= max_len, PAD after EOS
    scores: torch.Tensor  # [B], total log-probability of each returned sequence


@torch.no_grad()
def beam_search(
    model: UL2,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    max_len: int,
    beam_size: int = 1,
    use_cache: bool = True,
    all_finished: Callable[[torch.Tensor], bool] = lambda finished: bool(finished.all()),
) -> Decoded:
    """memory [B, L, d_model] and memory_mask [B, L] from the encoder -> the best sequence per
    example. ``all_finished(finished)`` decides when to stop early: ranks that decode different
    examples under ZeRO-3 must stop together (each step gathers weights collectively), so the
    trainer passes a collective version."""
    if max_len < 1 or beam_size < 1:
        raise ValueError(f"max_len and beam_size must be >= 1, got {max_len} and {beam_size}")
    pad, eos = model.cfg.pad_id, model.cfg.eos_id
    batch, k = memory.shape[0], beam_size
    state = model.start_decoding(
        memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0), use_cache
    )
    seqs = torch.full((batch * k, 1), pad, dtype=torch.long, device=memory.device)
    # Only the first beam starts alive, so the first step does not pick k copies of one token.
    scores = torch.full((batch, k), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0
    finished = torch.zeros(batch * k, dtype=torch.bool, device=memory.device)
    row_base = (torch.arange(batch, device=memory.device) * k)[:, None]

    for _ in range(max_len):
        logits = model.decode(seqs[:, -1:] if use_cache else seqs, state)[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        logp[finished] = float("-inf")
        logp[finished, pad] = 0.0
        vocab = logp.shape[-1]
        scores, flat_choice = (
            (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab).topk(k, dim=-1)
        )
        rows = (row_base + flat_choice // vocab).reshape(-1)
        tokens = (flat_choice % vocab).reshape(-1, 1)
        seqs = torch.cat([seqs[rows], tokens], dim=1)
        finished = finished[rows] | (tokens[:, 0] == eos)
        state.reorder(rows)
        if all_finished(finished):
            break
    best = seqs[:, 1:].reshape(batch, k, -1)[:, 0]  # topk sorts, so beam 0 is the best
    return Decoded(best, scores[:, 0])
