"""Recall@k against a brute-force ranking by sorting."""

import pytest
import torch
import torch.nn.functional as F

from pali3_train.eval.retrieval import recall_at_k


def _brute_force(sims: torch.Tensor, k: int) -> float:
    hits = [i in sims[i].argsort(descending=True)[:k].tolist() for i in range(len(sims))]
    return sum(hits) / len(hits)


def test_recall_matches_sorting_both_ways():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 8, generator=g))
    texts = F.normalize(images + 0.8 * torch.randn(40, 8, generator=g))
    got = recall_at_k(images, texts, ks=(1, 5))
    sims = images @ texts.T
    for k in (1, 5):
        assert got[f"i2t_r{k}"] == pytest.approx(_brute_force(sims, k))
        assert got[f"t2i_r{k}"] == pytest.approx(_brute_force(sims.T, k))
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < 1


def test_perfect_and_hopeless_pairs():
    eye = torch.eye(6)
    assert recall_at_k(eye, eye, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    shifted = eye.roll(1, dims=0)
    assert recall_at_k(eye, shifted, ks=(1,)) == {"i2t_r1": 0.0, "t2i_r1": 0.0}


def test_a_repeated_caption_is_a_right_answer_whichever_copy_ranks_first():
    images = torch.eye(3)
    # pairs 0 and 2 share a caption; image 2 is closer to text 0 than to its own text 2
    texts = torch.tensor([[0.3, 0.0, 0.9], [0.0, 1.0, 0.0], [0.2, 0.0, 0.85]])
    plain = recall_at_k(images, texts, ks=(1,))
    assert plain == {"i2t_r1": pytest.approx(2 / 3), "t2i_r1": pytest.approx(2 / 3)}
    grouped = recall_at_k(images, texts, ks=(1,), caption_ids=torch.tensor([7, 1, 7]))
    assert grouped == {"i2t_r1": 1.0, "t2i_r1": 1.0}
