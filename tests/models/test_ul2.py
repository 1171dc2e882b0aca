"""UL2 against HuggingFace's T5ForConditionalGeneration (v1.1, gated-GELU and gated-SiLU)."""

import pytest
import torch

from pali3_train.convert.t5 import ul2_from_hf
from pali3_train.losses.text import token_cross_entropy
from pali3_train.models import UL2
from pali3_train.models.ul2 import relative_position_bucket, shift_right
from tests.hf_reference import hf_t5, ul2_config


def _batch(cfg, lengths=(9, 5, 7), target_lengths=(6, 3, 5)):
    """Right-padded inputs and EOS-terminated, right-padded targets of varied lengths."""
    inputs = torch.full((len(lengths), max(lengths)), cfg.pad_id)
    targets = torch.full((len(target_lengths), max(target_lengths)), cfg.pad_id)
    for row, (n, m) in enumerate(zip(lengths, target_lengths)):
        inputs[row, :n] = torch.randint(2, cfg.vocab_size, (n,))
        targets[row, : m - 1] = torch.randint(2, cfg.vocab_size, (m - 1,))
        targets[row, m - 1] = cfg.eos_id
    return inputs, inputs != cfg.pad_id, targets, targets != cfg.pad_id


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "gated-silu"])
def test_logits_and_loss_match_huggingface(feed_forward):
    cfg = ul2_config(feed_forward)
    hf = hf_t5(cfg)
    ours = UL2(cfg).eval()
    ours.load_state_dict(ul2_from_hf(hf.state_dict()))
    inputs, input_mask, targets, target_mask = _batch(cfg)
    labels = targets.masked_fill(~target_mask, -100)
    with torch.no_grad():
        reference = hf(input_ids=inputs, attention_mask=input_mask.long(), labels=labels)
        logits = ours(inputs, input_mask, shift_right(targets, cfg.pad_id))
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        token_cross_entropy(logits, targets, target_mask), reference.loss, atol=1e-5, rtol=1e-5
    )


def test_encoder_output_ignores_padding():
    """Extra padding must change nothing for the real tokens (the mask really masks)."""
    cfg = ul2_config("gated-silu")
    model = UL2(cfg).eval()
    inputs, mask, targets, _ = _batch(cfg)
    padded = torch.cat([inputs, torch.full((3, 4), cfg.pad_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    decoder_in = shift_right(targets, cfg.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(
            model(inputs, mask, decoder_in),
            model(padded, padded_mask, decoder_in),
            atol=1e-5,
            rtol=1e-5,
        )


def test_decoder_is_causal():
    cfg = ul2_config("gated-gelu")
    model = UL2(cfg).eval()
    inputs, mask, targets, _ = _batch(cfg)
    decoder_in = shift_right(targets, cfg.pad_id)
    changed = decoder_in.clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(inputs, mask, decoder_in), model(inputs, mask, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def _reference_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing written out for one scalar, as the paper describes it."""
    import math

    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    exact = num_buckets // 2
    if n < exact:
        return bucket + n
    large = exact + int(
        math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    )
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets(bidirectional):
    rel = torch.arange(-300, 301)
    ours = relative_position_bucket(rel, bidirectional, 32, 128)
    expected = [_reference_bucket(int(r), bidirectional, 32, 128) for r in rel]
    assert ours.tolist() == expected
