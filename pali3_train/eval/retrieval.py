"""Image-text retrieval recall@k from paired embeddings: how often a matching caption is among an
image's k most similar texts (image -> text), and the other way round.

A held-out set often repeats a caption ("a handwritten digit seven" for every seven). Texts equal
to an image's own caption are all right answers for it, as COCO counts any of an image's five
captions: otherwise the score would depend on which of two identical texts rounding happens to
put first, i.e. on the batch size the embeddings were computed with.
"""

from __future__ import annotations

import torch


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    caption_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """image_emb, text_emb [N, E], row i of each a pair -> {"i2t_r1": ..., "t2i_r5": ...}.

    caption_ids [N] (default: all different) says which pairs share a caption: pair j's text
    (or image) is a right answer for pair i when their ids are equal. A query's rank is the
    number of wrong answers scoring at least as high as its best right one (ties count against).
    """
    sims = image_emb.float() @ text_emb.float().T
    if caption_ids is None:
        caption_ids = torch.arange(len(sims), device=sims.device)
    right = caption_ids[:, None] == caption_ids[None, :]
    i2t_rank = _rank(sims, right)
    t2i_rank = _rank(sims.T, right.T)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


def _rank(sims: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per query row: how many wrong candidates score >= the best right one."""
    best_right = sims.masked_fill(~right, float("-inf")).amax(1, keepdim=True)
    return ((sims >= best_right) & ~right).sum(1)
