"""Zero-shot classification on embeddings whose answer is known by construction."""

import torch
import torch.nn.functional as F

from pali3_train.eval.zero_shot import labels_from_captions, zero_shot_accuracy

CLASSES = ["zero", "one", "two"]


def test_labels_are_the_one_class_name_a_caption_contains():
    captions = ["a handwritten digit one", "Two apples", "one or two", "nothing", "someone"]
    assert labels_from_captions(captions, CLASSES) == [1, 2, None, None, None]


def test_accuracy_counts_the_nearest_class_text():
    g = torch.Generator().manual_seed(0)
    class_emb = F.normalize(torch.randn(3, 16, generator=g))
    truth = [0, 1, 2, 2, 1, 0, 1]
    images = F.normalize(class_emb[truth] + 0.05 * torch.randn(7, 16, generator=g))
    captions = [f"a handwritten digit {CLASSES[t]}" for t in truth] + ["one and two"]
    images = torch.cat([images, images[:1]])  # the ambiguous last caption is left out

    def embed(prompts):
        assert prompts == [f"digit {name}" for name in CLASSES]
        return class_emb

    right = zero_shot_accuracy(images, captions, CLASSES, "digit {}", embed)
    assert right == {"accuracy": 1.0, "chance": 1 / 3, "samples": 7.0}
    wrong = zero_shot_accuracy(
        images, captions, CLASSES, "digit {}", lambda p: class_emb.roll(1, 0)
    )
    assert wrong["accuracy"] == 0.0
