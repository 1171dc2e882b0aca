"""The generated demo corpus: reproducible from its seed, every record usable by its tasks, texts
true to the pixels, a tokenizer that covers all four scripts, and shards webdataset reads."""

from __future__ import annotations

import io
import json
import re
import tarfile
import unicodedata
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from pali3_train.config import load_config
from pali3_train.config.schema import DataConfig
from pali3_train.data_pipeline import demo_corpus, write_shards
from pali3_train.data_pipeline.demo_corpus import (
    BACKGROUND,
    COLOURS,
    DEMO_CORPORA,
    OCR_WORDS,
    PLACES,
    SOURCES,
    build_demo_corpus,
    clips,
    corpus_text,
    digits,
    scenes,
    text_images,
)
from pali3_train.data_pipeline.loader import DataPipeline, resolve_sources
from pali3_train.data_pipeline.manifest import Manifest
from pali3_train.data_pipeline.tasks import TASKS, format_example
from pali3_train.data_pipeline.video import FrameStride, sample_clip
from pali3_train.tokenizer import UNK_ID, Tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SAMPLES, PER_SHARD = 40, 16  # 3 shards per source, the last one short


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds with seed 0 in different folders and one with seed 1."""
    return [
        build_demo_corpus(tmp_path_factory.mktemp(f"demo{i}"), seed, SAMPLES, PER_SHARD)
        for i, seed in enumerate((0, 0, 1))
    ]


def _samples(corpus, name: str) -> list[dict]:
    pattern = str(corpus.out_dir / name / corpus.manifests[name].pattern)
    return list(wds.WebDataset(pattern, shardshuffle=False))


def _image(sample: dict) -> np.ndarray:
    encoded = sample.get("png") or sample.get("jpg")
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _shard_members(corpus) -> dict[str, list[tuple[str, bytes]]]:
    members = {}
    for name, manifest in corpus.manifests.items():
        for shard in manifest.shards:
            with tarfile.open(corpus.out_dir / name / shard.file) as tar:
                members[shard.file] = [(m.name, tar.extractfile(m).read()) for m in tar]
    return members


# ------------------------------------------------------------------------------ reproducible


def test_same_seed_gives_identical_shards_and_tokenizer(builds):
    first, again, other = builds
    assert first.out_dir != again.out_dir
    for name, manifest in first.manifests.items():
        assert manifest.shards == again.manifests[name].shards  # names, counts, sizes, sha256
        assert manifest.samples == SAMPLES and len(manifest.shards) == 3
        assert (first.out_dir / name / manifest.tokenizer).resolve() == first.tokenizer_path
    assert first.tokenizer_path.read_bytes() == again.tokenizer_path.read_bytes()

    ours, theirs = _shard_members(first), _shard_members(other)
    assert ours.keys() == theirs.keys()
    assert all(ours[shard] != theirs[shard] for shard in ours)


def test_generators_draw_nothing_from_global_random_state():
    np.random.seed(1)
    before = [(e.key, e.image, e.record) for e in text_images(5, seed=3)]
    np.random.seed(2)
    assert before == [(e.key, e.image, e.record) for e in text_images(5, seed=3)]


# ------------------------------------------------------------------------------ usable records


def test_every_record_formats_for_its_tasks_and_languages(builds):
    rng = np.random.default_rng(0)
    corpus = builds[0]
    for name, manifest in corpus.manifests.items():
        assert manifest.tasks == SOURCES[name].tasks
        for sample in _samples(corpus, name):
            assert re.fullmatch(rf"{name}-\d{{9}}(-\d{{4}})?", sample["__key__"])
            record = json.loads(sample["json"])
            for task in manifest.tasks:
                held = set(record[TASKS[task].record_field])
                # An OCR record holds the one language drawn; the others hold all of them.
                assert len(held) == 1 if task == "ocr" else held == set(manifest.languages)
                for lang in held:
                    prompt, target = format_example(task, record, [lang], rng)
                    assert f" in {lang.upper()}" in prompt and target
            assert _image(sample).shape == (64, 64, 3)


@pytest.mark.parametrize("generator", [scenes, text_images, digits])
@pytest.mark.parametrize("size", [32, 96])
def test_images_have_the_requested_size(generator, size):
    for example in generator(6, seed=1, image_size_px=size):
        with Image.open(io.BytesIO(example.image)) as image:
            assert image.format == {"png": "PNG", "jpg": "JPEG"}[example.image_format]
            assert (image.size, image.mode) == ((size, size), "RGB")


# ------------------------------------------------------------------------------ faithful texts


def _scene_from_pixels(image: np.ndarray) -> frozenset[tuple[str, str, str]]:
    """(colour, shape, place) of every shape drawn, read back from the pixels alone: the colour
    of the quadrant's non-background pixels, the shape from how much of their bounding box they
    fill (square 1, circle ~0.78, triangle ~0.5)."""
    half = image.shape[0] // 2
    names = {rgb: name for name, rgb in COLOURS.items()}
    found = set()
    for place in PLACES:
        top, left = half * place.startswith("bottom"), half * place.endswith("right")
        quadrant = image[top : top + half, left : left + half]
        ink = np.any(quadrant != BACKGROUND, axis=-1)
        if not ink.any():
            continue
        (colour,) = {names[tuple(int(v) for v in rgb)] for rgb in quadrant[ink]}
        rows, cols = np.nonzero(ink)
        fill = ink.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        found.add((colour, shape, place))
    return frozenset(found)


@pytest.mark.parametrize("size", [32, 64, 160])
def test_scene_texts_describe_the_pixels(size):
    examples = list(scenes(300, seed=5, image_size_px=size))
    records_of = defaultdict(set)  # content seen in the pixels -> distinct records
    for example in examples:
        content = _scene_from_pixels(np.asarray(Image.open(io.BytesIO(example.image))))
        record = example.record
        said = re.findall(r"an? (\w+) (\w+) at the (\w+ \w+)", record["caption"]["en"])
        assert frozenset(said) == content, record["caption"]["en"]
        assert record["vqa"]["en"][0] == ["how many shapes are there?", str(len(content))]
        for colour, shape, place in content:
            assert [f"what colour is the shape at the {place}?", colour] in record["vqa"]["en"]
            assert [f"where is the {colour} {shape}?", place] in record["vqa"]["en"]
        records_of[content].add(json.dumps(record, sort_keys=True))
    # The texts in every language are a function of the image content, and each caption tells
    # the content apart from every other content seen.
    assert max(len(records) for records in records_of.values()) == 1
    assert len(records_of) < len(examples)  # some scenes repeat, so the check above has teeth
    for lang in ("en", "de", "fr", "es"):
        captions = {json.loads(next(iter(r)))["caption"][lang] for r in records_of.values()}
        assert len(captions) == len(records_of)


def test_german_adjectives_follow_the_noun_gender():
    texts = " ".join(e.record["caption"]["de"] for e in scenes(100, seed=2))
    assert re.search(r"\bein \w+er Kreis\b", texts) and re.search(r"\bein \w+es Quadrat\b", texts)
    assert not re.search(r"\bein \w+es Kreis\b|\bein \w+er (Quadrat|Dreieck)\b", texts)


NUMBERS = "zero one two three four five six seven eight nine".split()


def test_digit_records_match_the_scanned_digit():
    data = load_digits()
    examples = list(digits(1800, seed=4, image_size_px=32))
    indices = [int(e.key.rsplit("-", 1)[1]) for e in examples]
    train_pool = [i for i in range(1797) if i % 5]
    assert sorted(indices[: len(train_pool)]) == train_pool  # one full pass before any repeat
    held_out = {int(e.key.rsplit("-", 1)[1]) for e in digits(400, seed=4, split="held_out")}
    assert held_out == set(range(0, 1797, 5)), "held-out scans are the ones training never sees"
    for example, index in zip(examples[::9], indices[::9]):
        label = int(data.target[index])
        assert example.record["vqa"]["en"][0] == ["which digit is this?", str(label)]
        assert example.record["caption"]["en"] == f"a handwritten digit {NUMBERS[label]}"
        # Shrunk back to 8x8, the picture is the scan it claims to be (dark ink on white).
        grey = Image.open(io.BytesIO(example.image)).convert("L")
        small = np.asarray(grey.resize((8, 8), Image.Resampling.BOX), dtype=float)
        ink = 16 - small * 16 / 255
        assert np.corrcoef(ink.ravel(), data.images[index].ravel())[0, 1] > 0.9


SCRIPT = {"en": {"LATIN"}, "de": {"LATIN"}, "ru": {"CYRILLIC"}, "el": {"GREEK"}}


def test_text_images_show_their_words_in_their_script():
    examples = list(text_images(80, seed=6))
    languages = set()
    for example in examples:
        ((lang, text),) = example.record["ocr"].items()
        languages.add(lang)
        words = text.split()
        assert 1 <= len(words) <= 3 and set(words) <= set(OCR_WORDS[lang].split())
        assert {unicodedata.name(c).split()[0] for c in text if c != " "} == SCRIPT[lang]
        image = np.asarray(Image.open(io.BytesIO(example.image)), dtype=int)
        ink = np.abs(image - image[0, 0]).max(axis=-1) > 60
        assert 0.02 < ink.mean() < 0.5, text
        rows, cols = np.nonzero(ink)  # the words are centred
        assert abs((rows.min() + rows.max()) / 2 - 32) < 10
        assert abs((cols.min() + cols.max()) / 2 - 32) < 6
    assert languages == {"en", "de", "ru", "el"}


def _centre(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
    """(x, y) of the pixels of ``colour`` (within H.264's error), None where there are few."""
    near = np.abs(frame.astype(int) - COLOURS[colour]).max(axis=-1) < 40
    if near.sum() < 20:
        return None
    rows, cols = np.nonzero(near)
    return cols.mean(), rows.mean()


MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
STORY = re.compile(
    r"a (\w+) (\w+) (?:moves (\w+)|appears) then a (\w+) (\w+) (?:moves (\w+)|appears)"
)


def test_clip_texts_describe_the_motion_and_order_in_the_pixels():
    """Both clips training reads, decoded from the mp4: frames 0, 2, 4, 6 (also what evaluation
    reads, centred) and 1, 3, 5, 7. The mover goes where the caption sends it (three eighths of
    the frame from frame 0 to 6; two or three from 1 to 7, as its first step falls before frame
    1 when it moves first); the newcomer is absent, then there; the caption's order is the
    pixels' order in both, and the answers agree."""
    stories = set()
    for example in clips(40, seed=3):
        caption = example.record["caption"]["en"]
        c1, s1, d1, c2, s2, d2 = STORY.fullmatch(caption).groups()
        (mover, direction), newcomer = ((c1, d1), c2) if d1 else ((c2, d2), c1)
        moves_first = bool(d1)
        # seed 0's first uniform is 0.637: start floor(0.637 * 2) = 1 of the starts 0 and 1
        for rng, travel in ((None, {True: 24, False: 24}), (0, {True: 16, False: 24})):
            draw = None if rng is None else np.random.default_rng(rng)
            clip, mask = sample_clip(example.image, 64, 4, FrameStride(frames=2), draw)
            frames = clip.permute(0, 2, 3, 1).numpy()
            path = [_centre(f, mover) for f in frames]
            shown = [_centre(f, newcomer) is not None for f in frames]
            moved = [np.subtract(p, path[0]) @ MOTION[direction] for p in path]
            assert mask.all() and moved[0] == 0, (caption, moved)
            assert abs(moved[3] - travel[moves_first]) < 2, (caption, rng, moved)
            assert shown[0] is False and shown[3] is True, caption
            assert (moved[1] > 4, shown[1]) == ((True, False) if moves_first else (False, True))
        answers = dict(example.record["vqa"]["en"])
        mover_name = f"{mover} {s1 if d1 else s2}"
        assert answers[f"which way does the {mover_name} move?"] == direction
        assert answers[f"does the {mover_name} move first?"] == ("yes" if moves_first else "no")
        stories.add((moves_first, direction))
    assert len(stories) == 8, "both orders and all four directions occur"


def test_a_build_with_videos_keeps_the_image_corpus_and_reads_as_clips(builds, tmp_path):
    corpus = build_demo_corpus(tmp_path, 0, SAMPLES, PER_SHARD, video_samples=6)
    without = builds[0]
    assert corpus.manifests == without.manifests  # same image shards (sha256) ...
    assert corpus.tokenizer_path.read_bytes() == without.tokenizer_path.read_bytes()  # tokenizer
    (manifest,) = corpus.video_manifests.values()
    assert manifest.samples == 6 and manifest.tasks == ("video_caption", "video_qa")
    assert set(map(json.dumps, manifest.videos.values())) == {
        json.dumps({"frames": 8, "fps": 8.0, "duration_s": 1.0})
    }
    assert without.video_sources() == ()
    assert [e.name for e in corpus.sources()] == [e.name for e in without.sources()]

    assert [e.image for e in clips(3, seed=1)] == [e.image for e in clips(3, seed=1)]
    tokenizer = Tokenizer.load(corpus.tokenizer_path)
    for example in clips(6):
        for text in _strings(example.record):
            assert UNK_ID not in tokenizer.encode(text), text
    data = DataConfig(tokenizer_path=str(corpus.tokenizer_path), sources=corpus.video_sources(),
                      max_frames=4)  # fmt: skip
    batches = list(DataPipeline(data, image_size_px=64, seed=0, batch_size=6, mode="epoch"))
    assert sum(map(len, batches)) == 12  # 6 clips, each captioned and questioned
    for batch in batches:
        assert batch.images.shape[1:] == (4, 3, 64, 64) and batch.frame_mask.all()
    prompts = {p.split(":")[0] for b in batches for p in tokenizer.batch_decode(b.prompt)}
    assert prompts == {"Caption the video in EN", "Answer in EN"}


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [text for item in items for text in _strings(item)]


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_covers_every_text_of_all_four_scripts(builds):
    corpus = builds[0]
    tokenizer = Tokenizer.load(corpus.tokenizer_path)
    examples = {name: list(s.generator(SAMPLES, 0, 64)) for name, s in SOURCES.items()}
    texts = list(corpus_text(examples))
    scripts = {unicodedata.name(c).split()[0] for text in texts for c in text if c.isalpha()}
    assert scripts == {"LATIN", "CYRILLIC", "GREEK"}
    assert any("ß" in text for text in texts) and any("Answer in DE:" in t for t in texts)
    for text in texts:
        assert UNK_ID not in tokenizer.encode(text), text
    # BPE learned the corpus's words, not just its characters.
    assert len(tokenizer.encode("a red circle at the top left", add_eos=False)) == 7


# ------------------------------------------------------------------------------ shards, mixture


def test_write_shards_cli_with_the_digits_generator(tmp_path, capsys):
    write_shards.main(
        [
            "--generator",
            "pali3_train.data_pipeline.demo_corpus:digits",
            "--count",
            "25",
            "--seed",
            "1",
        ]
        + ["--out", str(tmp_path), "--name", "digits", "--tasks", "caption,alt_text,vqa"]
        + ["--languages", "en,de,fr,es", "--max-samples-per-shard", "10"]
    )
    assert "wrote 25 samples in 3 shard(s)" in capsys.readouterr().out
    manifest = Manifest.read(tmp_path)
    assert manifest.verify(tmp_path) == []
    samples = list(wds.WebDataset(str(tmp_path / manifest.pattern), shardshuffle=False))
    expected = list(digits(25, seed=1))
    assert [s["__key__"] for s in samples] == [e.key for e in expected]
    assert [s["jpg"] for s in samples] == [e.image for e in expected]
    assert [json.loads(s["json"]) for s in samples] == [e.record for e in expected]


def test_sources_make_a_mixture_the_loader_accepts(builds):
    corpus = builds[0]
    entries = corpus.sources()
    expected = {f"{name}_{task}" for name, s in SOURCES.items() for task in s.tasks}
    assert {e.name for e in entries} == expected and len(entries) == 8
    data = DataConfig(tokenizer_path=str(corpus.tokenizer_path), sources=entries)
    for resolved in resolve_sources(data):
        name = resolved.spec.name.split("_", 1)[0]
        assert Path(resolved.spec.shards).is_absolute()
        assert len(resolved.urls) == len(corpus.manifests[name].shards)
        assert resolved.spec.languages == SOURCES[name].languages

    weights = {e.name: e.weight for e in corpus.sources({"vqa": 2.0, "digits_vqa": 0.1})}
    assert (weights["scenes_vqa"], weights["digits_vqa"]) == (2.0, 0.1)
    assert weights["text_ocr"] == SOURCES["text"].weights["ocr"]
    with pytest.raises(ValueError, match="captions"):
        corpus.sources({"captions": 1.0})


def test_cli_builds_and_summarises(tmp_path, capsys):
    demo_corpus.main(["--out", str(tmp_path), "--samples-per-source", "12"])
    out = capsys.readouterr().out
    for name in SOURCES:
        assert f"{name}: 12 samples in 1 shards" in out
        assert Manifest.read(tmp_path / name).samples == 12
    assert f"tokenizer: {tmp_path.resolve() / 'tokenizer.model'}" in out


def test_the_shipped_demo_mixture_is_what_a_default_build_gives(tmp_path):
    shipped = load_config(CONFIGS / "mixtures" / "demo.yaml").data
    corpus = build_demo_corpus(tmp_path, samples_per_source=512, samples_per_shard=64)
    relocated = [
        replace(s, shards=s.shards.replace("runs/demo_corpus", str(tmp_path)))
        for s in shipped.sources
    ]
    assert tuple(relocated) == corpus.sources()
    assert shipped.tokenizer_path == "runs/demo_corpus/tokenizer.model"


def test_the_tiny_video_transfer_reads_what_the_demo_build_writes(tmp_path):
    """configs/tiny/transfer_video.yaml's sources are the video entries of the --demo corpora:
    same names, tasks, stride and shard patterns (128 clips at 64 a shard: 2 shards, as 512 at
    256 and 128 at 64 are)."""
    shipped = load_config(CONFIGS / "tiny" / "transfer_video.yaml")
    assert [DEMO_CORPORA[f"runs/{c}"]["video_samples"] for c in ("demo_corpus", "demo_eval")] == [
        512,
        128,
    ]
    corpus = build_demo_corpus(tmp_path, 0, 8, 64, video_samples=128)
    for sources, folder in (
        (shipped.data.sources, "demo_corpus"),
        (shipped.eval.sources, "demo_eval"),
    ):
        relocated = [
            replace(s, shards=s.shards.replace(f"runs/{folder}", str(tmp_path))) for s in sources
        ]
        assert [replace(s, weight=1.0) for s in relocated] == [
            replace(s, weight=1.0) for s in corpus.video_sources()
        ]
    assert shipped.data.max_frames == 4
