"""Tensor parallelism (TP=2 on two real gloo ranks) against the unsharded model built from the
same seed: forward, gradients (of images and of clips), optimizer steps, frozen towers. Tolerance
1e-5 (fp32; the only difference is the order of a few sums)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import nn

from pali3_train.models import SigLIP
from pali3_train.parallel import (
    ColumnParallelLinear,
    ParallelDims,
    apply_activation_checkpointing,
    parallelize,
)
from tests.parallel.helpers import (
    assemble,
    gather_tp,
    pali3_batch,
    randomise_vectors,
    run_on_ranks,
    tiny_config,
    tiny_pali3,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _assert_matches_unsharded(assembled: dict, reference: dict) -> None:
    assert assembled.keys() == reference.keys()
    for name, ref in reference.items():
        got = assembled[name]
        if ref is None:
            assert got is None, f"{name} has a gradient the unsharded model does not"
        elif got.shape == ref.shape:  # tensor-parallel shards, concatenated
            torch.testing.assert_close(got, ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        else:  # replicated: every TP rank's copy
            torch.testing.assert_close(
                got, ref.expand_as(got), **TOL, msg=lambda m, n=name: f"{n}: {m}"
            )


# ------------------------------------------------------------------------ forward + backward


def _pali3_forward_backward(dims: ParallelDims, out: str) -> None:
    full = tiny_pali3()
    variants = {
        "tp": parallelize(copy.deepcopy(full), dims),
        "tp+checkpointing": apply_activation_checkpointing(parallelize(copy.deepcopy(full), dims)),
    }
    batch = pali3_batch(full.cfg)
    reference = full(*batch)
    reference.loss.backward()
    results = {
        "reference": {
            "loss": reference.loss.detach(),
            "logits": full.ul2.lm_head(reference.hidden).detach(),
            "grads": {n: p.grad for n, p in full.named_parameters()},
            "keys": list(full.state_dict()),
        }
    }
    for label, model in variants.items():
        output = model(*batch)
        output.loss.backward()
        logits = model.ul2.lm_head(output.hidden).detach()
        results[label] = {
            "loss": gather_tp(output.loss),
            "local_logits_shape": tuple(logits.shape),
            "logits": gather_from_tensor_model_parallel_region(logits),
            "grads": assemble(model, lambda p: p.grad),
            "keys": list(model.state_dict()),
            "swapped": sum(isinstance(m, ColumnParallelLinear) for m in model.modules()),
        }
    results |= _video_forward_backward(full, variants["tp"])
    if dist.get_rank() == 0:
        torch.save(results, out)


def _video_forward_backward(full: nn.Module, sharded: nn.Module) -> dict:
    """A batch of clips (3 frames, the second sample's last two padded) through the same two
    models: the frames are one batch of images to the ViT, so TP needs nothing new."""
    images, prompt, prompt_mask, target, target_mask = pali3_batch(full.cfg, seed=5, batch=6)
    clips = images.unflatten(0, (2, 3))  # [2, 3, 3, S, S]
    frame_mask = torch.tensor([[True, True, True], [True, False, False]])
    text = (prompt[:2], prompt_mask[:2], target[:2], target_mask[:2])
    results = {}
    for label, model in (("video reference", full), ("video tp", sharded)):
        model.zero_grad(set_to_none=True)
        loss = model(clips, *text, frame_mask=frame_mask).loss
        loss.backward()
        grads = (
            {n: p.grad for n, p in model.named_parameters()}
            if model is full
            else assemble(model, lambda p: p.grad)
        )
        results[label] = {"loss": gather_tp(loss) if model is sharded else loss.detach(),
                          "grads": grads}  # fmt: skip
    return results


@pytest.fixture(scope="module")
def pali3_tp2(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp") / "pali3.pt"
    run_on_ranks(_pali3_forward_backward, 2, 2, str(out))
    return torch.load(out)


@pytest.mark.parametrize("variant", ["tp", "tp+checkpointing"])
def test_pali3_loss_and_logits_match_unsharded(pali3_tp2, variant):
    ref, got = pali3_tp2["reference"], pali3_tp2[variant]
    assert got["swapped"] > 0, "parallelize swapped in megatron layers"
    batch, length, vocab = ref["logits"].shape
    assert got["local_logits_shape"] == (batch, length, vocab // 2), "logits stay vocab-sharded"
    torch.testing.assert_close(got["logits"], ref["logits"], **TOL)
    for rank_loss in got["loss"]:  # the same loss on both TP ranks
        torch.testing.assert_close(rank_loss, ref["loss"], **TOL)


@pytest.mark.parametrize("variant", ["tp", "tp+checkpointing"])
def test_pali3_gradients_match_unsharded(pali3_tp2, variant):
    ref, got = pali3_tp2["reference"], pali3_tp2[variant]
    assert got["keys"] == ref["keys"], "state-dict keys are those of the plain model"
    _assert_matches_unsharded(got["grads"], ref["grads"])


def test_a_video_batch_matches_unsharded(pali3_tp2):
    ref, got = pali3_tp2["video reference"], pali3_tp2["video tp"]
    for rank_loss in got["loss"]:
        torch.testing.assert_close(rank_loss, ref["loss"], **TOL)
    _assert_matches_unsharded(got["grads"], ref["grads"])


def _siglip_forward_backward(dims: ParallelDims, out: str) -> None:
    torch.manual_seed(0)
    full = SigLIP(tiny_config())
    randomise_vectors(full)
    sharded = parallelize(copy.deepcopy(full), dims)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(0, 512, (3, 10), generator=g)
    weights = torch.randn(2, 3, 64, generator=g)  # a loss that reaches every parameter
    results = {}
    for label, model in (("reference", full), ("tp", sharded)):
        image_emb, text_emb = model(images, tokens)
        ((image_emb * weights[0]).sum() + (text_emb * weights[1]).sum()).backward()
        grads = (
            {n: p.grad for n, p in model.named_parameters()}
            if model is full
            else assemble(model, lambda p: p.grad)
        )
        results[label] = {"image": image_emb.detach(), "text": text_emb.detach(), "grads": grads}
    if dist.get_rank() == 0:
        torch.save(results, out)


def test_siglip_embeddings_and_gradients_match_unsharded(tmp_path):
    run_on_ranks(_siglip_forward_backward, 2, 2, str(tmp_path / "siglip.pt"))
    results = torch.load(tmp_path / "siglip.pt")
    ref, got = results["reference"], results["tp"]
    torch.testing.assert_close(got["image"], ref["image"], **TOL)
    torch.testing.assert_close(got["text"], ref["text"], **TOL)
    _assert_matches_unsharded(got["grads"], ref["grads"])


# --------------------------------------------------------------------------- optimizer steps


def _train(dims: ParallelDims, out: str, freeze_vit: bool, checkpointing: bool) -> None:
    full = tiny_pali3(freeze_vit)
    initial = {n: p.detach().clone() for n, p in full.named_parameters()}
    sharded = parallelize(copy.deepcopy(full), dims)
    if checkpointing:
        apply_activation_checkpointing(sharded)
    # eps=1e-4, not 1e-8: attention's k_proj.bias has an analytically zero gradient (softmax
    # ignores a shift shared by all keys); Adam would blow its rounding noise up to lr-sized steps
    # that differ between any two summation orders, sharded or not.
    pairs = [(m, torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4)) for m in (full, sharded)]
    vit_grads = []
    for step in range(3):
        batch = pali3_batch(full.cfg, seed=10 + step)
        for model, optimizer in pairs:
            optimizer.zero_grad()
            model(*batch).loss.backward()
            optimizer.step()
        vit_grads.append(any(p.grad is not None for p in sharded.vit.parameters()))
    results = {
        "initial": initial,
        "reference": {n: p.detach() for n, p in full.named_parameters()},
        "tp": assemble(sharded, lambda p: p.detach()),
        "frozen": sorted(n for n, p in sharded.named_parameters() if not p.requires_grad),
        "vit_grads": vit_grads,
    }
    if dist.get_rank() == 0:
        torch.save(results, out)


def test_adamw_steps_keep_matching_unsharded(tmp_path):
    run_on_ranks(_train, 2, 2, str(tmp_path / "train.pt"), False, False)
    results = torch.load(tmp_path / "train.pt")
    _assert_matches_unsharded(results["tp"], results["reference"])
    moved = max((results["reference"][n] - p).abs().max() for n, p in results["initial"].items())
    assert moved > 1e-3, "the steps changed the parameters"


def test_frozen_vit_stays_frozen_under_tp_with_checkpointing(tmp_path):
    run_on_ranks(_train, 2, 2, str(tmp_path / "train.pt"), True, True)
    results = torch.load(tmp_path / "train.pt")
    vit = [n for n in results["initial"] if n.startswith("vit.")]
    assert results["frozen"] == sorted(vit), "exactly the ViT is frozen after parallelize"
    assert not any(results["vit_grads"]), "no gradients reach the frozen ViT"
    for name in vit:
        tp_copies = results["tp"][name]
        init = results["initial"][name]
        if tp_copies.shape != init.shape:
            init = init.expand_as(tp_copies)
        assert torch.equal(tp_copies, init), f"{name} changed"
    _assert_matches_unsharded(results["tp"], results["reference"])


# ------------------------------------------------------------------------ without processes


def test_tp1_is_a_no_op_and_generation_still_works():
    model = tiny_pali3().eval()
    before = [type(m) for m in model.modules()]
    assert parallelize(model, ParallelDims(world_size=4, tp=1)) is model
    assert [type(m) for m in model.modules()] == before
    images, prompt, prompt_mask, _, _ = pali3_batch(model.cfg)
    assert model.generate(images, prompt, prompt_mask, max_len=4).shape[0] == 2


def test_indivisible_heads_are_refused_before_anything_changes():
    model = tiny_pali3()  # 4 heads everywhere
    match = r"vit\.encoder\.blocks\.0\.attn\.qkv_proj: attention heads"
    with pytest.raises(ValueError, match=match):
        parallelize(model, ParallelDims(world_size=3, tp=3))
    assert all(type(m) is not ColumnParallelLinear for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) > 0


def test_parallelize_needs_the_model_parallel_groups():
    model = tiny_pali3()
    with pytest.raises(RuntimeError, match="init_model_parallel"):
        parallelize(model, ParallelDims(world_size=2, tp=2))
    assert all(type(m) is not ColumnParallelLinear for m in model.modules())


# ---------------------------------------------------------------------------------- generation


def _pali3_generate(dims: ParallelDims, out: str) -> None:
    full = tiny_pali3()
    sharded = parallelize(copy.deepcopy(full), dims)
    images, prompt, prompt_mask, *_ = pali3_batch(full.cfg)
    results = {}
    for beam_size in (1, 3):
        args = (images, prompt, prompt_mask, 8, beam_size)
        results[beam_size] = {"reference": full.generate(*args), "tp": sharded.generate(*args)}
    hidden = sharded(*pali3_batch(full.cfg)).hidden
    results["trains_sharded"] = tuple(sharded.ul2.lm_head(hidden).shape)
    gathered = [None] * dims.tp
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, out)


def test_pali3_generation_matches_unsharded(tmp_path):
    """Decoding under TP=2 gathers the vocabulary shards: greedy and beam search give the
    unsharded model's tokens on both ranks, and training logits stay sharded afterwards."""
    run_on_ranks(_pali3_generate, 2, 2, str(tmp_path / "generate.pt"))
    per_rank = torch.load(tmp_path / "generate.pt")
    vocab = tiny_config().ul2.vocab_size
    for results in per_rank:
        for beam_size in (1, 3):
            torch.testing.assert_close(results[beam_size]["tp"], results[beam_size]["reference"])
        assert results["trains_sharded"][-1] == vocab // 2
