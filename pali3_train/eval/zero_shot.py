"""Zero-shot classification: a class is the text "template.format(name)"; an image is assigned
the class whose text embedding is most similar. Labels come from the held-out captions: the one
class name that appears in a caption as a whole word (captions naming none or several are left
out and counted)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch


def labels_from_captions(captions: Sequence[str], classes: Sequence[str]) -> list[int | None]:
    patterns = [re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE) for name in classes]
    labels = []
    for caption in captions:
        found = [i for i, p in enumerate(patterns) if p.search(caption)]
        labels.append(found[0] if len(found) == 1 else None)
    return labels


def zero_shot_accuracy(
    image_emb: torch.Tensor,
    captions: Sequence[str],
    classes: Sequence[str],
    template: str,
    embed_texts: Callable[[list[str]], torch.Tensor],
) -> dict[str, float]:
    """image_emb [N, E] with the N held-out captions -> {"accuracy", "chance", "samples"}.
    ``embed_texts`` maps prompts to L2-normalised embeddings (the model's text tower)."""
    labels = labels_from_captions(captions, classes)
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        return {"accuracy": float("nan"), "chance": 1 / len(classes), "samples": 0.0}
    class_emb = embed_texts([template.format(name) for name in classes])
    predicted = (image_emb[keep].float() @ class_emb.float().T).argmax(1)
    truth = torch.tensor([labels[i] for i in keep], device=predicted.device)
    return {
        "accuracy": (predicted == truth).float().mean().item(),
        "chance": 1 / len(classes),
        "samples": float(len(keep)),
    }
