"""Activation checkpointing (one process): the same loss and gradients as without it, blocks
really recomputed, frozen towers fine, generation and parameter names untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pali3_train.models import PaLI3, SigLIP
from pali3_train.models.transformer import EncoderBlock
from pali3_train.parallel import apply_activation_checkpointing
from tests.parallel.helpers import pali3_batch, randomise_vectors, tiny_config, tiny_pali3


def _count_calls(modules: list[nn.Module]) -> list[int]:
    """Calls of each module's MLP/feed-forward child: 2 per step when its block is recomputed."""
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        child = module.mlp if isinstance(module, EncoderBlock) else module.ff

        def hook(*_, i=i):
            counts[i] += 1

        child.register_forward_pre_hook(hook)  # recomputation stops early, inside the child
    return counts


def _blocks(model: PaLI3) -> dict[str, list[nn.Module]]:
    return {
        "vit": list(model.vit.encoder.blocks),
        "ul2": [*model.ul2.encoder_layers, *model.ul2.decoder_layers],
    }


@pytest.mark.parametrize("freeze_vit", [False, True], ids=["trainable", "frozen-vit"])
def test_pali3_loss_and_gradients_are_unchanged_and_blocks_recomputed(freeze_vit):
    plain = tiny_pali3(freeze_vit)
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    counts = {k: _count_calls(v) for k, v in _blocks(checkpointed).items()}
    batch = pali3_batch(plain.cfg)
    expected, got = plain(*batch), checkpointed(*batch)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=name)
    assert counts["ul2"] == [2] * len(counts["ul2"]), "UL2 layers recomputed in backward"
    # A frozen ViT records no graph, so there is nothing to recompute (and no error).
    assert counts["vit"] == [1 if freeze_vit else 2] * len(counts["vit"])


def test_siglip_loss_and_gradients_are_unchanged():
    plain = SigLIP(tiny_config())
    randomise_vectors(plain)
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 512, (2, 10))
    for model in (plain, checkpointed):
        image_emb, text_emb = model(images, tokens)
        (image_emb * text_emb).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=name)


def test_a_frozen_block_on_an_input_without_grad_runs():
    block = apply_activation_checkpointing(EncoderBlock(16, 2, 32, 1e-6).requires_grad_(False))
    out = block(torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 16) and not out.requires_grad


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_is_unchanged(use_cache):
    plain = tiny_pali3(freeze_vit=False).eval()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    images, prompt, prompt_mask, _, _ = pali3_batch(plain.cfg)
    args = (images, prompt, prompt_mask, 5, 2, use_cache)
    assert torch.equal(checkpointed.generate(*args), plain.generate(*args))


def test_names_stay_and_copies_checkpoint_their_own_blocks():
    model = tiny_pali3(freeze_vit=False)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model)
    block = model.ul2.decoder_layers[0]
    wrapped = vars(block)["forward"]
    apply_activation_checkpointing(model)  # twice: no double wrapping
    assert vars(block)["forward"] is wrapped
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert clone.ul2.decoder_layers[0].forward.__self__ is clone.ul2.decoder_layers[0]
