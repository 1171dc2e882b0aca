"""PaLI-3 over video: each frame through the ViT on its own, the frames' tokens in time order
before the prompt, padded frames masked out and moved behind every real token (so a clip reads
the same whatever it is padded to, and an image as frame 0 of a clip as it does alone), and the
optional temporal embedding."""

from pathlib import Path

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.models import PaLI3
from pali3_train.models.ul2 import shift_right

ROOT = Path(__file__).resolve().parents[2]
FRAMES, BATCH = 4, 3


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "models" / "tiny.yaml").model


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(3)
    return PaLI3(cfg).eval()


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64, for comparisons that differ in the length of the sequence
    (the positions of padding): in float32 those round differently by a few units in the last
    place (about 1e-6 at the encoder's outputs of up to 3.5), which would blur the 1e-6 bound."""
    import copy

    return copy.deepcopy(model).double()


def _video_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vit.image_size_px
    frames = torch.rand(BATCH, FRAMES, 3, size, size, generator=g) * 2 - 1
    # sample 0 has every frame, sample 1 two, sample 2 one
    frame_mask = torch.arange(FRAMES)[None] < torch.tensor([[FRAMES], [2], [1]])
    prompt = torch.randint(2, cfg.ul2.vocab_size, (BATCH, 5), generator=g)
    prompt[1, 3:] = cfg.ul2.pad_id
    target = torch.randint(2, cfg.ul2.vocab_size, (BATCH, 4), generator=g)
    target[:, -1] = cfg.ul2.eos_id
    return frames, frame_mask, prompt, prompt != cfg.ul2.pad_id, target, target != cfg.ul2.pad_id


def _frame_by_frame(model, frames, frame_mask, prompt, prompt_mask, target, target_mask):
    """The reference: the ViT and the projection over one frame at a time, the tokens
    concatenated in time order, each frame's N tokens masked like the frame; then each sample's
    real positions first and its masked ones after, listed one by one."""
    per_frame = [model.projection(model.vit(frames[:, f])) for f in range(frames.shape[1])]
    n = per_frame[0].shape[1]
    visual_mask = torch.cat(
        [frame_mask[:, f : f + 1].expand(-1, n) for f in range(len(per_frame))], 1
    )
    x = torch.cat([*per_frame, model.ul2.embed(prompt)], dim=1)
    mask = torch.cat([visual_mask, prompt_mask], dim=1)
    order = [
        [i for i in range(len(row)) if row[i]] + [i for i in range(len(row)) if not row[i]]
        for row in mask.tolist()
    ]
    x = torch.stack([x[b, order[b]] for b in range(len(x))])
    mask = torch.stack([mask[b, order[b]] for b in range(len(mask))])
    memory = model.ul2.encode(x, mask)
    state = model.ul2.start_decoding(memory, mask, use_cache=False)
    hidden = model.ul2.decode_hidden(shift_right(target, model.cfg.ul2.pad_id), state)
    logits = model.ul2.lm_head(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits[target_mask], target[target_mask])
    return memory, mask, loss


@torch.no_grad()
def test_video_equals_the_vit_frame_by_frame_concatenated(cfg, model):
    frames, frame_mask, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    memory, mask = model.encode(frames, prompt, prompt_mask, frame_mask)
    loss = model(frames, prompt, prompt_mask, target, target_mask, frame_mask).loss
    ref_memory, ref_mask, ref_loss = _frame_by_frame(
        model, frames, frame_mask, prompt, prompt_mask, target, target_mask
    )
    n = cfg.vit.num_patches
    assert memory.shape == (BATCH, FRAMES * n + prompt.shape[1], cfg.ul2.d_model)
    assert torch.equal(mask, ref_mask)
    # sample 1: two real frames and three real prompt tokens first, then the padding
    assert mask[1, : 2 * n + 3].all() and not mask[1, 2 * n + 3 :].any()
    torch.testing.assert_close(memory, ref_memory, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)


@torch.no_grad()
def test_padded_frames_change_no_output_of_the_real_tokens(cfg, model):
    frames, frame_mask, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    other = frames.clone()
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(9)) * 3
    other[~frame_mask] = noise[~frame_mask]
    runs = [
        (model.encode(x, prompt, prompt_mask, frame_mask),
         model(x, prompt, prompt_mask, target, target_mask, frame_mask).loss)
        for x in (frames, other)
    ]  # fmt: skip
    ((memory, mask), loss), ((other_memory, _), other_loss) = runs
    assert torch.equal(memory[mask], other_memory[mask])
    assert torch.equal(loss, other_loss)
    # and the generated answers (greedy decoding reads the same encoder output)
    answers = [
        model.generate(x, prompt, prompt_mask, 5, frame_mask=frame_mask) for x in (frames, other)
    ]
    assert torch.equal(*answers)


def _real_tokens_alone(model, frames, prompt, target):
    """The reference for one sample with no padding at all: its real frames [n, 3, H, W]
    through the ViT and projection one at a time, its real prompt tokens [p], no mask to read
    -> (encoder output [n*N + p, d_model], summed token loss, target tokens)."""
    visual = [model.projection(model.vit(frame[None])) for frame in frames]
    x = torch.cat([*visual, model.ul2.embed(prompt[None])], dim=1)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    memory = model.ul2.encode(x, mask)
    state = model.ul2.start_decoding(memory, mask, use_cache=False)
    hidden = model.ul2.decode_hidden(shift_right(target[None], model.cfg.ul2.pad_id), state)
    logits = model.ul2.lm_head(hidden)[0]
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return memory[0], loss, len(target)


def _padded_to(frames, frame_mask, count):
    """The clips as ``count`` frames: the real ones first, as they were, then noise frames
    masked out (``count`` may be less than F if the clips' real frames fit)."""
    generator = torch.Generator().manual_seed(count)
    noise = torch.randn(len(frames), count, *frames.shape[2:], generator=generator,
                        dtype=frames.dtype) * 3  # fmt: skip
    mask = torch.zeros(len(frames), count, dtype=torch.bool)
    for b, real in enumerate(frame_mask.sum(1).tolist()):
        noise[b, :real] = frames[b, frame_mask[b]]
        mask[b, :real] = True
    return noise, mask


@torch.no_grad()
@pytest.mark.parametrize("count", [2, FRAMES, 7, 16])
def test_a_clip_padded_to_any_length_reads_as_its_real_frames_alone(cfg, model64, count):
    """UL2's relative-position bias counts every slot, masked or not: padded frames left between
    the real frames and the prompt would move the prompt (and the loss with it). Each sample's
    encoder output at its real positions, and the batch's loss, must be those of its real frames
    and real prompt tokens alone, whatever the clip is padded to."""
    model = model64
    frames, frame_mask, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    frames = frames.double()
    if count < FRAMES:  # only clips whose real frames fit
        keep = frame_mask.sum(1) <= count
        frames, frame_mask, prompt, prompt_mask, target, target_mask = (
            t[keep] for t in (frames, frame_mask, prompt, prompt_mask, target, target_mask)
        )
    clips, clip_mask = _padded_to(frames, frame_mask, count)
    memory, mask = model.encode(clips, prompt, prompt_mask, clip_mask)
    loss = model(clips, prompt, prompt_mask, target, target_mask, clip_mask).loss
    total, tokens = 0.0, 0
    for b in range(len(clips)):
        ref_memory, ref_loss, ref_tokens = _real_tokens_alone(
            model, frames[b, frame_mask[b]], prompt[b, prompt_mask[b]], target[b, target_mask[b]]
        )
        torch.testing.assert_close(memory[b][mask[b]], ref_memory, atol=1e-6, rtol=0)
        real = len(ref_memory)  # and they come first
        assert mask[b, :real].all() and not mask[b, real:].any()
        total, tokens = total + ref_loss, tokens + ref_tokens
    torch.testing.assert_close(loss, total / tokens, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("count", [2, 4, 16])
def test_an_image_reads_as_frame_0_of_a_clip_as_it_does_alone(cfg, model64, count):
    """In a mixture with a video source an image is frame 0 of a clip, the rest masked: it must
    train as it is evaluated and generated alone (an image mixture: no frame mask)."""
    model = model64
    frames, _, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    image = frames[:, 0].double()
    plain, plain_mask = model.encode(image, prompt, prompt_mask)
    plain_loss = model(image, prompt, prompt_mask, target, target_mask).loss
    clips, clip_mask = _padded_to(image[:, None], torch.ones(BATCH, 1, dtype=torch.bool), count)
    memory, mask = model.encode(clips, prompt, prompt_mask, clip_mask)
    loss = model(clips, prompt, prompt_mask, target, target_mask, clip_mask).loss
    for b in range(BATCH):
        torch.testing.assert_close(memory[b][mask[b]], plain[b][plain_mask[b]], atol=1e-6,
                                   rtol=0)  # fmt: skip
        real = int(plain_mask[b].sum())  # and they come first
        assert mask[b, :real].all() and not mask[b, real:].any()
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)


def test_a_padded_clip_trains_inside_the_device_guard(cfg, model):
    """Moving the padding creates no tensor without device= (the trainer's guard on CPU)."""
    from pali3_train.engine.device_guard import DeviceGuard

    frames, frame_mask, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    with DeviceGuard(torch.device("cpu")):
        loss = model(frames, prompt, prompt_mask, target, target_mask, frame_mask).loss
        loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_a_still_image_is_a_one_frame_clip(cfg, model):
    frames, _, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    image = frames[:, 0]
    as_image = model(image, prompt, prompt_mask, target, target_mask).loss
    as_clip = model(image[:, None], prompt, prompt_mask, target, target_mask).loss
    assert torch.equal(as_image, as_clip)


def _with_temporal_embedding(cfg, model):
    from dataclasses import replace

    temporal = PaLI3(replace(cfg, temporal_embedding=True)).eval()
    missing, unexpected = temporal.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["temporal_embed.weight"] and not unexpected
    return temporal


@torch.no_grad()
def test_the_temporal_embedding_starts_at_zero_then_tells_frames_apart(cfg, model):
    temporal = _with_temporal_embedding(cfg, model)
    frames, frame_mask, prompt, prompt_mask, target, target_mask = _video_batch(cfg)
    batch = (frames, prompt, prompt_mask, target, target_mask, frame_mask)
    assert torch.equal(temporal.temporal_embed.weight, torch.zeros(16, cfg.ul2.d_model))
    assert torch.equal(temporal(*batch).loss, model(*batch).loss)
    # frame f's tokens gain row f of the table (after the projection)
    temporal.temporal_embed.weight.normal_()
    visual, _ = temporal.embed_visual(frames, frame_mask)
    plain, _ = model.embed_visual(frames, frame_mask)
    n = cfg.vit.num_patches
    for f in range(FRAMES):
        added = visual[:, f * n : (f + 1) * n] - plain[:, f * n : (f + 1) * n]
        torch.testing.assert_close(added, temporal.temporal_embed.weight[f].expand_as(added))


def test_more_frames_than_the_temporal_embedding_holds_are_refused(cfg, model):
    temporal = _with_temporal_embedding(cfg, model)
    size = cfg.vit.image_size_px
    with pytest.raises(ValueError, match="17 frames"):
        temporal.embed_visual(torch.zeros(1, 17, 3, size, size))
