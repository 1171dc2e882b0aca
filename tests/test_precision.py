"""The bf16 precision policy, asserted on dtypes and on values against fp32 computations done
by hand: norms compute in fp32 and return bf16, the token loss and the SigLIP embeddings and
loss are fp32 in a bf16 model, DeepSpeed gets fp32 master weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pali3_train.config import load_config
from pali3_train.losses.text import TokenLoss
from pali3_train.models import PaLI3, SigLIP
from pali3_train.models.fused import LayerNorm, RMSNorm
from pali3_train.precision import at_least_fp32, deepspeed_section, upcast
from tests.engine.conftest import ROOT

TINY = load_config(ROOT / "configs" / "tiny" / "stage1.yaml").model


def _bf16_input(*shape: int) -> torch.Tensor:
    # A large common offset: the mean and variance lose digits when summed in bf16.
    return (torch.randn(*shape) * 0.1 + 30.0).to(torch.bfloat16)


def _bf16_norm(x: torch.Tensor, weight: torch.Tensor, centre: bool) -> torch.Tensor:
    """The norm in bf16 arithmetic throughout: what the policy rules out."""
    x = x - x.mean(-1, keepdim=True) if centre else x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norms_compute_in_fp32_and_return_bf16(kind):
    norm = (RMSNorm if kind == "rms" else LayerNorm)(256, 1e-6).to(torch.bfloat16)
    norm.weight.data = (1 + torch.randn(256) * 0.1).to(torch.bfloat16)
    x = _bf16_input(4, 256)
    got = norm(x)
    assert got.dtype == norm.weight.dtype == torch.bfloat16
    weight = norm.weight.float()
    if kind == "rms":
        in_fp32 = F.rms_norm(x.float(), (256,), weight, 1e-6)
    else:
        in_fp32 = F.layer_norm(x.float(), (256,), weight, norm.bias.float(), 1e-6)
    assert torch.equal(got, in_fp32.to(torch.bfloat16))
    assert not torch.equal(_bf16_norm(x, norm.weight, kind == "layer"), got)  # tells them apart


@pytest.mark.parametrize("chunk_tokens", [None, 3], ids=["all logits", "chunked"])
def test_a_bf16_pali3_returns_an_fp32_loss_from_bf16_logits(chunk_tokens):
    model = PaLI3(TINY).to(torch.bfloat16)
    model.token_loss = TokenLoss(chunk_tokens=chunk_tokens)
    vit = TINY.vit
    images = torch.randn(2, 3, vit.image_size_px, vit.image_size_px, dtype=torch.bfloat16)
    prompt, target = torch.randint(2, 100, (2, 5)), torch.randint(2, 100, (2, 4))
    ones = torch.ones_like
    out = model(
        images, prompt, ones(prompt, dtype=torch.bool), target, ones(target, dtype=torch.bool)
    )
    logits = model.ul2.lm_head(out.hidden)
    assert logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    by_hand = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_a_bf16_siglip_gives_fp32_unit_embeddings():
    cfg = load_config(ROOT / "configs" / "tiny" / "stage0.yaml").model
    model = SigLIP(cfg).to(torch.bfloat16)
    vit = cfg.vit
    images = torch.randn(3, 3, vit.image_size_px, vit.image_size_px, dtype=torch.bfloat16)
    image_emb, text_emb = (
        model.embed_images(images),
        model.embed_texts(torch.randint(2, 99, (3, 8))),
    )
    assert image_emb.dtype == text_emb.dtype == torch.float32
    ones = torch.ones(3)
    assert torch.allclose(image_emb.norm(dim=-1), ones) and torch.allclose(
        text_emb.norm(dim=-1), ones
    )


def test_upcasting_keeps_fp32_and_fp64_as_they_are():
    assert at_least_fp32(torch.bfloat16) == at_least_fp32(torch.float16) == torch.float32
    assert at_least_fp32(torch.float64) == torch.float64
    x = torch.ones(2)
    assert upcast(x) is x


def test_deepspeed_gets_bf16_or_nothing():
    assert deepspeed_section("fp32") == {"bf16": {"enabled": False}}
    assert deepspeed_section("bf16") == {"bf16": {"enabled": True}}
