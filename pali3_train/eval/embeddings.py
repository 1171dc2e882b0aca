"""The contrastive objective's evaluator: image-text retrieval recall on one held-out source, and
zero-shot classification where the config names classes for it.

Every rank embeds the same samples: under ZeRO-3 and tensor parallelism each forward needs all
ranks, and the embeddings are small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pali3_train.config import ZeroShotConfig
from pali3_train.eval.evaluator import Batches
from pali3_train.eval.retrieval import recall_at_k
from pali3_train.eval.zero_shot import zero_shot_accuracy
from pali3_train.models import SigLIP
from pali3_train.tokenizer import Tokenizer


@dataclass(frozen=True)
class EmbeddingEvaluator:
    name: str
    batches: Batches  # targets are the captions
    tokenizer: Tokenizer
    zero_shot: tuple[ZeroShotConfig, ...] = ()  # the tasks on this source
    max_text_tokens: int = 64  # class prompts are encoded like training texts

    @torch.no_grad()
    def run(self, model: SigLIP) -> dict[str, float]:
        images, texts, captions = [], [], []
        for batch in self.batches():
            images.append(model.embed_images(batch.images))
            texts.append(model.embed_texts(batch.target))
            captions += self.tokenizer.batch_decode(batch.target)
        image_emb, text_emb = torch.cat(images), torch.cat(texts)
        ids = _caption_ids(captions, image_emb.device)
        metrics = recall_at_k(image_emb, text_emb, caption_ids=ids)
        for task in self.zero_shot:
            embed = self._prompt_embedder(model, image_emb.device)
            found = zero_shot_accuracy(image_emb, captions, task.classes, task.template, embed)
            metrics["zero_shot_accuracy"] = found["accuracy"]
            metrics["zero_shot_chance"] = found["chance"]
        return metrics

    def _prompt_embedder(self, model: SigLIP, device: torch.device):
        def embed(prompts: list[str]) -> torch.Tensor:
            tokens, _ = self.tokenizer.batch_encode(prompts, self.max_text_tokens)
            return model.embed_texts(tokens.to(device))

        return embed


def _caption_ids(captions: list[str], device: torch.device) -> torch.Tensor:
    """One id per distinct caption, so that repeated captions count as the same right answer."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], device=device)
