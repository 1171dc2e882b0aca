"""PaLI-3 composition checked end to end against HuggingFace: SiglipVisionModel tokens, a linear
projection, prepended to the embedded prompt and fed to T5ForConditionalGeneration."""

import pytest
import torch

from pali3_train.convert.pali3 import NEW_IN_PALI3, pali3_from_towers
from pali3_train.convert.siglip import siglip_from_hf
from pali3_train.convert.t5 import ul2_from_hf
from pali3_train.models import PaLI3
from tests.hf_reference import TEXT, VIT, hf_siglip, hf_t5, model_config, ul2_config


@pytest.fixture(scope="module")
def models():
    cfg = model_config(ul2_config("gated-silu"))
    hf_vision, hf_text = hf_siglip(), hf_t5(cfg.ul2)
    model = PaLI3(cfg).eval()
    missing, unexpected = model.load_state_dict(
        pali3_from_towers(
            siglip_from_hf(hf_vision.state_dict(), VIT, TEXT), ul2_from_hf(hf_text.state_dict())
        ),
        strict=False,
    )
    assert sorted(missing) == sorted(NEW_IN_PALI3) and not unexpected
    return cfg, hf_vision, hf_text, model


def _batch(cfg, batch=3):
    images = torch.randn(batch, 3, VIT.image_size_px, VIT.image_size_px)
    prompt = torch.randint(2, cfg.ul2.vocab_size, (batch, 6))
    prompt[1, 4:] = cfg.ul2.pad_id
    target = torch.randint(2, cfg.ul2.vocab_size, (batch, 5))
    target[:, -1] = cfg.ul2.eos_id
    target[2, 2] = cfg.ul2.eos_id
    target[2, 3:] = cfg.ul2.pad_id
    return images, prompt, prompt != cfg.ul2.pad_id, target, target != cfg.ul2.pad_id


def test_loss_and_logits_match_huggingface_composition(models):
    cfg, hf_vision, hf_text, model = models
    images, prompt, prompt_mask, target, target_mask = _batch(cfg)
    w, b = model.projection.weight, model.projection.bias
    with torch.no_grad():
        visual = hf_vision.vision_model(pixel_values=images).last_hidden_state @ w.T + b
        embeds = torch.cat([visual, hf_text.shared(prompt)], dim=1)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=torch.long), prompt_mask.long()], 1)
        reference = hf_text(
            inputs_embeds=embeds, attention_mask=mask, labels=target.masked_fill(~target_mask, -100)
        )
        ours = model(images, prompt, prompt_mask, target, target_mask)
    logits = model.ul2.lm_head(ours.hidden)
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_visual_tokens_come_before_the_prompt(models):
    cfg, _, _, model = models
    images, prompt, prompt_mask, _, _ = _batch(cfg)
    with torch.no_grad():
        _, mask = model.encode(images, prompt, prompt_mask)
    assert mask.shape == (3, VIT.num_patches + prompt.shape[1])
    assert mask[:, : VIT.num_patches].all()
    assert torch.equal(mask[:, VIT.num_patches :], prompt_mask)


def test_padding_neither_in_prompt_nor_target_changes_the_loss(models):
    cfg, _, _, model = models
    images, prompt, prompt_mask, target, target_mask = _batch(cfg)
    pad = torch.full((3, 3), cfg.ul2.pad_id)
    with torch.no_grad():
        base = model(images, prompt, prompt_mask, target, target_mask).loss
        longer = model(
            images,
            torch.cat([prompt, pad], 1),
            torch.cat([prompt_mask, pad != pad], 1),
            torch.cat([target, pad], 1),
            torch.cat([target_mask, pad != pad], 1),
        ).loss
    torch.testing.assert_close(base, longer, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generation_is_the_same_with_and_without_cache(models, beam_size):
    cfg, _, _, model = models
    images, prompt, prompt_mask, _, _ = _batch(cfg)
    cached = model.generate(images, prompt, prompt_mask, max_len=6, beam_size=beam_size)
    uncached = model.generate(
        images, prompt, prompt_mask, max_len=6, beam_size=beam_size, use_cache=False
    )
    assert torch.equal(cached, uncached)
