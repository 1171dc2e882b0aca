"""`python -m pali3_train.generate` and the batched decoding behind the evaluators: the answers
are the model's own greedy/beam tokens, decoded, from an exported file or a checkpoint folder."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pali3_train import generate
from pali3_train.config import load_config, to_dict
from pali3_train.convert.safetensors_io import read_metadata, save_weights
from pali3_train.data_pipeline.demo_corpus import build_demo_corpus
from pali3_train.data_pipeline.transforms import decode_image, normalize_images
from pali3_train.generate import generate_answers, load_pali3, main, prepare
from pali3_train.models import PaLI3
from pali3_train.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny PaLI-3 exported with its config and tokenizer, and a demo image."""
    folder = tmp_path_factory.mktemp("generate")
    corpus = build_demo_corpus(folder / "corpus", samples_per_source=8, samples_per_shard=8,
                               image_size_px=32, vocab_size=1024)  # fmt: skip
    cfg = load_config(ROOT / "configs" / "models" / "tiny.yaml")
    torch.manual_seed(11)
    model = PaLI3(cfg.model)
    path = folder / "model.safetensors"
    metadata = {"kind": "pali3", "model": json.dumps(to_dict(cfg.model)),
                "tokenizer": str(corpus.tokenizer_path)}  # fmt: skip
    save_weights(model.state_dict(), path, metadata)
    image = folder / "image.png"
    from PIL import Image

    pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    return {"path": path, "model": model.eval(), "tokenizer": corpus.tokenizer_path, "image": image}


@pytest.mark.parametrize("beam_size", [1, 3])
def test_answers_are_the_models_decoded_tokens(exported, beam_size):
    model, tokenizer = load_pali3(exported["path"])
    reference, prompt = exported["model"], "Caption in EN:"
    batch = prepare([exported["image"]] * 2, [prompt] * 2, tokenizer, 32)
    answers = generate_answers(model, tokenizer, batch, max_len=12, beam_size=beam_size)
    # Independently: resize, normalise, tokenise and decode by hand with the original model.
    pixels = normalize_images(decode_image(exported["image"].read_bytes(), 32)[None])
    ids = torch.tensor([tokenizer.encode(prompt)])
    tokens = reference.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), 12, beam_size)
    assert answers == [Tokenizer.load(exported["tokenizer"]).decode(tokens[0])] * 2


# Five token lengths (5, 15, 9, 11, 7 with the demo tokenizer), so every batch pads some prompts.
PROMPTS = ["Caption in EN:", "Answer in EN: what colour is the circle at the top left?",
           "Generate the ocr_text in EN:", "Answer in EN: what colour is the square?",
           "Answer in EN: what?"]  # fmt: skip
PHOTOS = ["a.jpg", "b.png", "c.jpeg", "d.PNG", "e.webp"]  # in sorted order


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of five images of different sizes and formats, and a file that is no image."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    generator = torch.Generator().manual_seed(2)
    for i, name in enumerate(PHOTOS[::-1]):
        pixels = torch.randint(0, 256, (24 + 8 * i, 40, 3), generator=generator)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def reference_answer(exported, image: Path, prompt: str, dtype=torch.float32) -> str:
    """One (image, prompt) answered by hand with the original model: no batching, no padding."""
    if dtype not in exported:  # a copy: casting the shared model would round its weights
        exported[dtype] = copy.deepcopy(exported["model"]).to(dtype)
    model = exported[dtype]
    pixels = normalize_images(decode_image(image.read_bytes(), 32)[None], dtype)
    tokenizer = Tokenizer.load(exported["tokenizer"])
    ids = torch.tensor([tokenizer.encode(prompt)])
    tokens = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), 8)
    return tokenizer.decode(tokens[0])


def run_cli(capsys, exported, *args: str) -> list[dict]:
    """The output records of ``python -m pali3_train.generate`` run in this process."""
    main(["--checkpoint", str(exported["path"]), "--max-tokens", "8", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def write_questions(folder: Path, photos: Path) -> Path:
    """A JSONL file in ``folder``: relative and absolute image paths, ids on some lines, and an
    order that is not the images' sorted order."""
    lines = [{"id": "q1", "image": "photos/e.webp", "prompt": PROMPTS[1]},
             {"image": str(photos / "a.jpg"), "prompt": PROMPTS[0]},
             {"id": 7, "image": "photos/c.jpeg", "prompt": PROMPTS[2]},
             {"id": "q4", "image": "photos/b.png", "prompt": PROMPTS[3]},
             {"id": "q5", "image": "photos/a.jpg", "prompt": PROMPTS[4]}]  # fmt: skip
    (folder / "photos").symlink_to(photos, target_is_directory=True)
    path = folder / "questions.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_a_folder_is_its_images_sorted_each_asked_the_prompt(exported, photos, capsys):
    records = run_cli(capsys, exported, "--image", str(photos), str(exported["image"]),
                      "--prompt", PROMPTS[0], "--batch-size", "2")  # fmt: skip
    images = [photos / name for name in PHOTOS] + [exported["image"]]
    answers = [reference_answer(exported, image, PROMPTS[0]) for image in images]
    assert records == [
        {"image": str(image), "prompt": PROMPTS[0], "answer": answer}
        for image, answer in zip(images, answers)
    ]


def test_jsonl_questions_keep_their_order_ids_and_relative_paths(exported, photos, capsys,
                                                                 tmp_path):  # fmt: skip
    questions = write_questions(tmp_path, photos)
    records = run_cli(capsys, exported, "--input", str(questions), "--batch-size", "2")
    lines = [json.loads(line) for line in questions.read_text().splitlines() if line]
    answers = [reference_answer(exported, tmp_path / q["image"], q["prompt"]) for q in lines]
    assert records == [q | {"answer": answer} for q, answer in zip(lines, answers)]
    assert len({r["answer"] for r in records}) > 1, "every answer alike: order is not tested"


def test_batches_of_one_and_of_three_give_the_same_answers(exported, photos, capsys, tmp_path):
    """Prompts of different lengths share a batch right-padded to the longest: the prompt mask
    must keep that padding out of every answer."""
    questions = write_questions(tmp_path, photos)
    tokenizer = Tokenizer.load(exported["tokenizer"])
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == 5
    one = run_cli(capsys, exported, "--input", str(questions), "--batch-size", "1")
    three = run_cli(capsys, exported, "--input", str(questions), "--batch-size", "3")
    lines = [json.loads(line) for line in questions.read_text().splitlines() if line]
    alone = [reference_answer(exported, tmp_path / q["image"], q["prompt"]) for q in lines]
    assert [r["answer"] for r in one] == alone
    assert [r["answer"] for r in three] == alone


def test_output_goes_to_a_jsonl_file(exported, photos, capsys, tmp_path):
    out = tmp_path / "answers.jsonl"
    assert run_cli(capsys, exported, "--image", str(photos), "--prompt", "x", "--out",
                   str(out)) == []  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(photos / name) for name in PHOTOS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]  # no temporary left


def test_a_crash_leaves_no_output_file(exported, photos, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generate, "generate_answers", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["--checkpoint", str(exported["path"]), "--image", str(photos), "--prompt", "x",
              "--out", str(out)])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_bf16_runs_on_the_cpu(exported, photos, capsys):
    records = run_cli(capsys, exported, "--image", str(photos), "--prompt", PROMPTS[1],
                      "--device", "cpu", "--dtype", "bf16", "--batch-size", "1")  # fmt: skip
    assert len(records) == 5 and all(isinstance(r["answer"], str) for r in records)
    expected = [reference_answer(exported, Path(r["image"]), PROMPTS[1], torch.bfloat16)
                for r in records]  # fmt: skip
    assert [r["answer"] for r in records] == expected


@pytest.mark.parametrize(
    "line, message",
    [('{"image": "image.png"}', ':3: no "prompt" field'),
     ('{"prompt": "x"}', ':3: no "image" field'),
     ('{"image": "image.png", "prompt": 5}', ':3: "prompt" is not a string'),
     ('["image.png", "x"]', ":3: not a JSON object"),
     ('{"image": "image.png", ', ":3: not JSON"),
     ('{"image": "nope.png", "prompt": "x"}', ":3: image {folder}/nope.png is not a file"),
     ('{"video": "nope.mp4", "prompt": "x"}', ":3: video {folder}/nope.mp4 is not a file"),
     ('{"image": "image.png", "video": "v.mp4", "prompt": "x"}', ':3: both "image" field and')],
)  # fmt: skip
def test_a_bad_jsonl_line_is_named_before_the_model_loads(exported, capsys, tmp_path, line,
                                                          message):  # fmt: skip
    questions = tmp_path / "q.jsonl"
    (tmp_path / "image.png").symlink_to(exported["image"])
    good = json.dumps({"image": "image.png", "prompt": "x"})
    questions.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(SystemExit) as stopped:  # loading the model first would fail otherwise
        main(["--checkpoint", "no-such-model.safetensors", "--input", str(questions)])
    assert stopped.value.code == 2
    assert f"--input {questions}{message.format(folder=tmp_path)}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [(["--image", "{tmp}/nope.png", "--prompt", "x"], "--image: {tmp}/nope.png is not a file"),
     (["--image", "{tmp}", "--prompt", "x"], "--image: {tmp} holds no .jpg/.jpeg/.png/.webp"),
     (["--image", "{tmp}"], "--image needs --prompt"),
     (["--video", "{tmp}/v.mp4", "--prompt", "x"], "--video: {tmp}/v.mp4 is not a file"),
     (["--video", "{tmp}/v.mp4"], "--video needs --prompt"),
     (["--video", "{tmp}/v.mp4", "--prompt", "x", "--max-frames", "17"], "at most 16, got 17"),
     (["--input", "{tmp}/q.jsonl"], "--input: {tmp}/q.jsonl is not a file"),
     (["--input", "{tmp}/q.jsonl", "--image", "{tmp}"], "not allowed with argument"),
     (["--image", "{tmp}", "--prompt", "x", "--out", "{tmp}/no/a.jsonl"], "is not a folder")],
)  # fmt: skip
def test_bad_arguments_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        main(["--checkpoint", "no-such-model.safetensors"] + [a.format(tmp=tmp_path) for a in args])
    assert stopped.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_the_command_line_prints_only_jsonl_on_stdout(exported, photos):
    result = subprocess.run(
        [sys.executable, "-m", "pali3_train.generate", "--checkpoint", str(exported["path"]),
         "--image", str(photos), "--prompt", "Caption in EN:", "--max-tokens", "8",
         "--batch-size", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSONL
    assert [r["image"] for r in records] == [str(photos / name) for name in PHOTOS]
    assert [r["answer"] for r in records] == [
        reference_answer(exported, Path(r["image"]), "Caption in EN:") for r in records
    ]


# ------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two mp4 files of random frames: 9 frames, and 2 (shorter than a 4-frame clip)."""
    from pali3_train.data_pipeline.video import encode_video

    folder = tmp_path_factory.mktemp("videos")
    generator = torch.Generator().manual_seed(4)
    for name, count in (("long.mp4", 9), ("short.mp4", 2)):
        frames = torch.randint(0, 256, (count, 24, 40, 3), generator=generator, dtype=torch.uint8)
        (folder / name).write_bytes(encode_video(frames.numpy(), fps=4.0))
    return folder


# The frames a centred clip takes, worked by hand (frame k at floor(start + k * step), start =
# half the frames the span leaves to spare; data_pipeline/video.py). long.mp4 has frames 0..8:
# - 4 frames 2 apart span 6 frames, 2 to spare, start 1: 1, 3, 5, 7;
# - 2 frames 3 apart span 3, 5 to spare, start 2.5: 2, 5;
# - 0.75 s at 4 fps is 3 frames: 3 of the 4 slots fit (0, 3, 6), 2 to spare, start 1: 1, 4, 7;
# - 1 s is 4 frames: 3 of 16 fit (0, 4, 8), none to spare: 0, 4, 8.
# short.mp4 has frames 0..1: each of these strides takes one frame, 1 to spare, start 0.5: 0.
INDICES = {
    ("long.mp4", "2 frames"): [1, 3, 5, 7],
    ("long.mp4", "3 frames"): [2, 5],
    ("long.mp4", "0.75 s"): [1, 4, 7],
    ("long.mp4", "1 s"): [0, 4, 8],
}


def hand_clip(video: Path, stride: str, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 clip [max_frames, 3, 32, 32], frame mask [max_frames]) of the hand-worked frames:
    every frame decoded with PyAV, those of ``INDICES`` kept and resized as images are, zeros
    after them, masked."""
    import av

    from pali3_train.data_pipeline.transforms import resize_square

    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == {"long.mp4": 9, "short.mp4": 2}[video.name]
    indices = INDICES.get((video.name, stride), [0])
    frames = [resize_square(torch.from_numpy(decoded[i]), 32) for i in indices]
    clip = torch.zeros(max_frames, 3, 32, 32, dtype=torch.uint8)
    clip[: len(frames)] = torch.stack(frames)
    mask = torch.arange(max_frames) < len(frames)
    return clip, mask


def reference_video_answer(exported, video: Path, prompt: str, stride: str = "2 frames",
                           max_frames: int = 4) -> str:  # fmt: skip
    """One (video, prompt) answered by hand, alone in its batch: the model's answer on the clip
    of the hand-worked frames (``hand_clip``)."""
    clip, frame_mask = hand_clip(video, stride, max_frames)
    tokenizer = Tokenizer.load(exported["tokenizer"])
    ids = torch.tensor([tokenizer.encode(prompt)])
    tokens = exported["model"].generate(normalize_images(clip[None]), ids, ids > -1, 8,
                                        frame_mask=frame_mask[None])  # fmt: skip
    return tokenizer.decode(tokens[0])


@pytest.fixture
def seen(monkeypatch):
    """The batches ``generate`` decodes, as it hands them to ``generate_answers``."""
    batches = []

    def spy(model, tokenizer, batch, *args, **kwargs):
        batches.append(batch)
        return generate_answers(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_answers", spy)
    return batches


def assert_clips(batch, files, stride: str, max_frames: int) -> None:
    """The batch's clips are the hand-worked ones, pixel for pixel, with their frame masks."""
    clips, masks = zip(*(hand_clip(f, stride, max_frames) for f in files))
    assert torch.equal(batch.frame_mask, torch.stack(masks))
    assert torch.equal(batch.images, normalize_images(torch.stack(clips)))


CLIPS = ("--max-frames", "4", "--frame-stride-frames", "2")


def test_videos_are_answered_from_their_evaluation_clips(exported, videos, capsys, seen):
    files = [videos / "long.mp4", videos / "short.mp4"]
    records = run_cli(capsys, exported, "--video", *map(str, files), "--prompt", PROMPTS[0],
                      "--batch-size", "2", *CLIPS)  # fmt: skip
    assert records == [
        {"video": str(f), "prompt": PROMPTS[0], "answer": reference_video_answer(exported, f,
                                                                                 PROMPTS[0])}
        for f in files
    ]  # fmt: skip
    assert_clips(seen[0], files, "2 frames", 4)


def test_jsonl_lines_mix_images_and_videos_in_order(exported, photos, videos, capsys, tmp_path):
    lines = [{"id": 1, "video": str(videos / "short.mp4"), "prompt": PROMPTS[1]},
             {"id": 2, "image": str(photos / "a.jpg"), "prompt": PROMPTS[0]},
             {"id": 3, "image": str(photos / "b.png"), "prompt": PROMPTS[3]},
             {"id": 4, "video": str(videos / "long.mp4"), "prompt": PROMPTS[4]}]  # fmt: skip
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = run_cli(capsys, exported, "--input", str(questions), "--batch-size", "3", *CLIPS)
    expected = [
        reference_video_answer(exported, Path(q["video"]), q["prompt"]) if "video" in q
        else reference_answer(exported, Path(q["image"]), q["prompt"])
        for q in lines
    ]  # fmt: skip
    assert records == [q | {"answer": a} for q, a in zip(lines, expected)]


def with_clips(exported, folder: Path, clips: dict) -> dict:
    """The exported model again, its metadata recording ``clips`` as a video stage's export
    does."""
    path = folder / "video.safetensors"
    metadata = {"kind": "pali3", "model": json.dumps(to_dict(exported["model"].cfg)),
                "tokenizer": str(exported["tokenizer"]), "clips": json.dumps(clips)}  # fmt: skip
    save_weights(exported["model"].state_dict(), path, metadata)
    return exported | {"path": path}


def test_an_export_records_how_its_stage_read_clips(tmp_path):
    from pali3_train.engine.export import save_export

    video_cfg = load_config(ROOT / "configs" / "tiny" / "transfer_video.yaml")
    out = save_export({"x": torch.zeros(1)}, tmp_path / "video" / "model.safetensors", video_cfg, 3)
    assert json.loads(read_metadata(out)["clips"]) == {
        "max_frames": 4,
        "strides": {"clips_video_caption": {"frames": 2}, "clips_video_qa": {"frames": 2}},
    }
    from dataclasses import replace

    data = video_cfg.data
    qa = replace(data.sources[1], frame_stride_frames=None, frame_stride_s=0.5)
    seconds = replace(video_cfg, data=replace(data, max_frames=8, sources=(data.sources[0], qa)))
    out = save_export({"x": torch.zeros(1)}, tmp_path / "s" / "model.safetensors", seconds, 3)
    assert json.loads(read_metadata(out)["clips"]) == {
        "max_frames": 8,
        "strides": {"clips_video_caption": {"frames": 2}, "clips_video_qa": {"seconds": 0.5}},
    }
    image_cfg = load_config(ROOT / "configs" / "tiny" / "stage1.yaml")
    out = save_export({"x": torch.zeros(1)}, tmp_path / "image" / "model.safetensors", image_cfg, 3)
    assert "clips" not in read_metadata(out)


def test_a_checkpoint_folder_records_its_clips_in_its_config(tmp_path):
    from dataclasses import asdict

    from pali3_train.engine.checkpoint import CheckpointMeta, write_meta

    cfg = load_config(ROOT / "configs" / "tiny" / "transfer_video.yaml")
    write_meta(tmp_path, CheckpointMeta(3, 96, 0, None, 2, to_dict(cfg)))
    assert generate.recorded_clips(tmp_path) == {
        "max_frames": 4,
        "strides": {"clips_video_caption": {"frames": 2}, "clips_video_qa": {"frames": 2}},
    }
    assert asdict(generate.trained_clips(generate.recorded_clips(tmp_path))) == {
        "max_frames": 4, "stride": {"seconds": None, "frames": 2},
    }  # fmt: skip


TRAINED = {"max_frames": 4, "strides": {"caption": {"frames": 2}, "qa": {"frames": 2}}}


@pytest.mark.parametrize(
    "args, stride, max_frames",
    [((), "2 frames", 4),  # the trained clip settings
     (("--max-frames", "2", "--frame-stride-frames", "3"), "3 frames", 2),  # the command line's
     (("--frame-stride-s", "0.75"), "0.75 s", 4)],  # one given: the other recorded
)  # fmt: skip
def test_video_defaults_are_how_the_model_was_trained(exported, videos, capsys, tmp_path, seen,
                                                      args, stride, max_frames):  # fmt: skip
    trained = with_clips(exported, tmp_path, TRAINED)
    files = [videos / "long.mp4", videos / "short.mp4"]
    records = run_cli(capsys, trained, "--video", *map(str, files), "--prompt", PROMPTS[0],
                      "--batch-size", "2", *args)  # fmt: skip
    assert_clips(seen[0], files, stride, max_frames)
    assert [r["answer"] for r in records] == [
        reference_video_answer(exported, f, PROMPTS[0], stride, max_frames) for f in files
    ]


def test_an_export_without_the_record_reads_16_frames_1_s_apart(exported, videos, capsys,
                                                                seen):  # fmt: skip
    files = [videos / "long.mp4", videos / "short.mp4"]
    records = run_cli(capsys, exported, "--video", *map(str, files), "--prompt", PROMPTS[0],
                      "--batch-size", "2")  # fmt: skip
    assert_clips(seen[0], files, "1 s", 16)
    assert [r["answer"] for r in records] == [
        reference_video_answer(exported, f, PROMPTS[0], "1 s", 16) for f in files
    ]


def test_video_sources_of_different_strides_leave_the_stride_to_the_command_line(
    exported, videos, capsys, tmp_path
):
    trained = with_clips(exported, tmp_path, {"max_frames": 4, "strides": {
        "caption": {"frames": 2}, "qa": {"seconds": 0.5}}})  # fmt: skip
    video = ["--video", str(videos / "long.mp4"), "--prompt", PROMPTS[0]]
    with pytest.raises(SystemExit) as stopped:
        run_cli(capsys, trained, *video)
    assert stopped.value.code == 2
    assert ("different strides (caption: 2 frames, qa: 0.5 s): pass --frame-stride-s or "
            "--frame-stride-frames") in capsys.readouterr().err  # fmt: skip
    assert len(run_cli(capsys, trained, *video, "--frame-stride-frames", "2")) == 1


def test_help_names_the_clip_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training stage's data.max_frames where the checkpoint records it, else 16" in text
    assert "video sources where the checkpoint records it, else 1.0" in text


def test_a_siglip_file_is_refused(tmp_path):
    path = tmp_path / "siglip.safetensors"
    save_weights({"x": torch.zeros(1)}, path, {"kind": "siglip", "model": "{}"})
    with pytest.raises(ValueError, match="no text decoder"):
        load_pali3(path)
