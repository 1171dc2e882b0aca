"""Greedy and beam search: against HuggingFace's greedy ``generate``, against exhaustive search,
and cached against uncached decoding."""

import itertools

import pytest
import torch

from pali3_train.config import UL2Config
from pali3_train.convert.t5 import ul2_from_hf
from pali3_train.models import UL2
from pali3_train.models.decoding import beam_search
from tests.hf_reference import hf_t5, ul2_config


def _encode(model: UL2, inputs: torch.Tensor):
    mask = inputs != model.cfg.pad_id
    with torch.no_grad():
        return model.encode(model.embed(inputs), mask), mask


def _inputs(cfg, batch=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, cfg.vocab_size, (batch, length), generator=g)
    for row in range(1, batch):
        inputs[row, length - row :] = cfg.pad_id  # different prompt lengths in one batch
    return inputs


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "gated-silu"])
def test_greedy_matches_huggingface_generate(feed_forward):
    cfg = ul2_config(feed_forward)
    hf = hf_t5(cfg)
    with torch.no_grad():  # make EOS likely enough that sequences end at different steps
        hf.lm_head.weight[cfg.eos_id] *= 4
    model = UL2(cfg).eval()
    model.load_state_dict(ul2_from_hf(hf.state_dict()))
    inputs = _inputs(cfg, batch=6)
    memory, mask = _encode(model, inputs)
    ours = beam_search(model, memory, mask, max_len=12, beam_size=1).tokens
    # HF's own cache is sized by the encoder's depth and breaks when the decoder is deeper
    # (transformers 5.23), so the reference decodes without a cache.
    reference = hf.generate(
        input_ids=inputs,
        attention_mask=mask.long(),
        max_new_tokens=12,
        do_sample=False,
        num_beams=1,
        use_cache=False,
    )[:, 1:]
    assert (reference == cfg.eos_id).any(), "the test should exercise early EOS"
    assert ours.tolist() == reference.tolist()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_and_uncached_decoding_give_identical_tokens(beam_size):
    cfg = ul2_config("gated-silu")
    model = UL2(cfg).eval()
    memory, mask = _encode(model, _inputs(cfg))
    cached = beam_search(model, memory, mask, max_len=10, beam_size=beam_size, use_cache=True)
    uncached = beam_search(model, memory, mask, max_len=10, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-5, rtol=1e-5)


def test_batched_decoding_equals_decoding_each_example_alone():
    cfg = ul2_config("gated-gelu")
    model = UL2(cfg).eval()
    inputs = _inputs(cfg)
    memory, mask = _encode(model, inputs)
    batched = beam_search(model, memory, mask, max_len=8, beam_size=2).tokens
    for row in range(len(inputs)):
        real = inputs[row : row + 1, : int(mask[row].sum())]
        single = beam_search(model, *_encode(model, real), max_len=8, beam_size=2).tokens
        assert batched[row, : single.shape[1]].tolist() == single[0].tolist()


def _sequence_logprob(model: UL2, memory, mask, tokens: list[int]) -> float:
    decoder_in = torch.tensor([[model.cfg.pad_id] + tokens[:-1]])
    with torch.no_grad():
        logits = model.decode(decoder_in, model.start_decoding(memory, mask, use_cache=False))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return float(sum(logp[i, t] for i, t in enumerate(tokens)))


def test_wide_beam_finds_the_most_likely_sequence_by_exhaustive_search():
    """With a beam wide enough never to prune, beam search must return the exact argmax over all
    sequences that end in EOS or reach max_len."""
    cfg = UL2Config(
        vocab_size=5,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=24,
        num_encoder_layers=1,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    model = UL2(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # peakier distributions: a wrong search would show
    memory, mask = _encode(model, torch.tensor([[2, 3, 4, 2]]))
    max_len = 3
    candidates = []
    for length in range(1, max_len + 1):
        for body in itertools.product(
            [t for t in range(cfg.vocab_size) if t != cfg.eos_id], repeat=length - 1
        ):
            candidates.append(list(body) + [cfg.eos_id])
            if length == max_len:
                candidates += [list(body) + [t] for t in range(cfg.vocab_size) if t != cfg.eos_id]
    scored = [(_sequence_logprob(model, memory, mask, c), c) for c in candidates]
    best_score, best = max(scored)

    result = beam_search(model, memory, mask, max_len=max_len, beam_size=cfg.vocab_size**max_len)
    found = result.tokens[0].tolist()
    found = found[: found.index(cfg.eos_id) + 1] if cfg.eos_id in found else found
    assert found == best
    assert abs(result.scores.item() - best_score) < 1e-5


def test_bad_arguments_are_refused():
    cfg = ul2_config("gated-gelu")
    model = UL2(cfg).eval()
    memory, mask = _encode(model, _inputs(cfg, batch=1))
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, memory, mask, max_len=4, beam_size=0)
