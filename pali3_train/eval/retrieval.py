"""Image-text retrieval recall@k from paired embeddings: how often the matching caption is among
an image's k most similar texts (image -> text), and the other way round."""

from __future__ import annotations

import torch


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """image_emb, text_emb [N, E], row i of each a pair -> {"i2t_r1": ..., "t2i_r5": ...}.
    Ties count against the pair (its rank is the number of others scoring at least as high)."""
    sims = image_emb.float() @ text_emb.float().T
    matching = sims.diagonal()
    i2t_rank = (sims > matching[:, None]).sum(1)  # texts beating the pair, per image
    t2i_rank = (sims > matching[None, :]).sum(0)  # images beating the pair, per text
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out
