"""A small WebLI-style corpus made on the spot: drawn shapes, rendered words, handwritten digits,
and short videos of moving shapes.

The training system needs shards, a tokenizer and a task mixture to run end to end, but WebLI
cannot be shipped and CI has no network, so this module draws them from what code can make or
installed packages ship: scenes of coloured shapes with captions, alt-texts and questions in four
languages; words in Latin, Cyrillic and Greek script rendered with matplotlib's DejaVu Sans for
OCR; scikit-learn's scanned handwritten digits; and, with ``--video-samples``, mp4 clips in which
one shape moves and another appears, in an order the captions and answers state (video
transfer, ``docs/video.md``). Every text is a function of the pixels alone, so a model can learn
it, and everything follows from one seed, so two builds are identical.

    python -m pali3_train.data_pipeline.demo_corpus --out runs/demo_corpus --seed 0
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pali3_train.cli import command_parser
from pali3_train.config import SourceConfig
from pali3_train.data_pipeline.manifest import Manifest
from pali3_train.data_pipeline.tasks import TASKS, format_example
from pali3_train.data_pipeline.video import encode_video
from pali3_train.data_pipeline.write_shards import Example, write_source
from pali3_train.tokenizer import Tokenizer, train_tokenizer

EUROPEAN = ("en", "de", "fr", "es")
# "held_out" draws from streams disjoint from "train": other random scenes and words, and the
# digit scans whose index is a multiple of 5 (training never sees those).
SPLITS = ("train", "held_out")


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


OCR_LANGUAGES = ("en", "de", "ru", "el")

# --- scenes ---------------------------------------------------------------------------------

BACKGROUND = (200, 200, 200)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # the four quadrants


@dataclass(frozen=True)
class Shape:
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    place: str  # one of PLACES


@dataclass(frozen=True)
class SceneWords:
    """One language's words for scenes. ``a`` and ``the`` hold a noun-phrase template per shape,
    because German adjective endings follow the noun's gender."""

    colours: dict[str, str]
    shapes: dict[str, str]
    places: dict[str, str]
    a: dict[str, str]
    the: dict[str, str]
    at: str
    join: str
    alt_text: str
    how_many: str
    which_colour: str
    which_shape: str
    where: str

    def phrase(self, templates: dict[str, str], item: Shape) -> str:
        return templates[item.shape].format(
            colour=self.colours[item.colour], shape=self.shapes[item.shape]
        )


def _words(colours: str, shapes: str, places: tuple[str, ...]) -> dict:
    return {
        "colours": dict(zip(COLOURS, colours.split())),
        "shapes": dict(zip(SHAPES, shapes.split())),
        "places": dict(zip(PLACES, places)),
    }


def _every_shape(template: str) -> dict[str, str]:
    return dict.fromkeys(SHAPES, template)


SCENE_WORDS = {
    "en": SceneWords(
        **_words("red green blue yellow purple", "circle square triangle", PLACES),
        a=_every_shape("a {colour} {shape}"),
        the=_every_shape("the {colour} {shape}"),
        at="{thing} at the {place}",
        join=" and ",
        alt_text="{things} on a grey background",
        how_many="how many shapes are there?",
        which_colour="what colour is the shape at the {place}?",
        which_shape="what shape is at the {place}?",
        where="where is {thing}?",
    ),
    "de": SceneWords(
        **_words(
            "rot grün blau gelb violett",
            "Kreis Quadrat Dreieck",
            ("oben links", "oben rechts", "unten links", "unten rechts"),
        ),
        a=_every_shape("ein {colour}es {shape}") | {"circle": "ein {colour}er {shape}"},
        the=_every_shape("das {colour}e {shape}") | {"circle": "der {colour}e {shape}"},
        at="{thing} {place}",
        join=" und ",
        alt_text="{things} auf grauem Hintergrund",
        how_many="wie viele Formen gibt es?",
        which_colour="welche Farbe hat die Form {place}?",
        which_shape="welche Form ist {place}?",
        where="wo ist {thing}?",
    ),
    "fr": SceneWords(
        **_words(
            "rouge vert bleu jaune violet",
            "cercle carré triangle",
            ("en haut à gauche", "en haut à droite", "en bas à gauche", "en bas à droite"),
        ),
        a=_every_shape("un {shape} {colour}"),
        the=_every_shape("le {shape} {colour}"),
        at="{thing} {place}",
        join=" et ",
        alt_text="{things} sur fond gris",
        how_many="combien de formes y a-t-il ?",
        which_colour="de quelle couleur est la forme {place} ?",
        which_shape="quelle forme est {place} ?",
        where="où est {thing} ?",
    ),
    "es": SceneWords(
        **_words(
            "rojo verde azul amarillo morado",
            "círculo cuadrado triángulo",
            (
                "arriba a la izquierda",
                "arriba a la derecha",
                "abajo a la izquierda",
                "abajo a la derecha",
            ),
        ),
        a=_every_shape("un {shape} {colour}"),
        the=_every_shape("el {shape} {colour}"),
        at="{thing} {place}",
        join=" y ",
        alt_text="{things} sobre fondo gris",
        how_many="¿cuántas formas hay?",
        which_colour="¿de qué color es la forma {place}?",
        which_shape="¿qué forma hay {place}?",
        where="¿dónde está {thing}?",
    ),
}


def scenes(
    count: int, seed: int = 0, image_size_px: int = 64, split: str = "train"
) -> Iterator[Example]:
    """1 or 2 shapes, each in its own quadrant and no two alike in both colour and shape (so every
    question has one answer), as PNG. Texts name the shapes in reading order of their quadrants."""
    rng = _rng(seed, split)
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for i in range(count):
        places = sorted(rng.choice(len(PLACES), size=int(rng.integers(1, 3)), replace=False))
        chosen = rng.choice(len(kinds), size=len(places), replace=False)
        shapes = [Shape(*kinds[k], PLACES[p]) for k, p in zip(chosen, places)]
        image = draw_scene(shapes, image_size_px, rng)
        yield Example(f"scenes-{i:09d}", _encode(image, "png"), "png", scene_record(shapes))


def draw_scene(shapes: list[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    """Each shape's side is 50-80% of its quadrant's, at a random offset inside it; drawn without
    anti-aliasing, so every pixel is either BACKGROUND or one of COLOURS."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = size // 2
    for item in shapes:
        side = int(rng.integers(half // 2, half * 4 // 5 + 1))
        left = half * item.place.endswith("right") + int(rng.integers(1, half - side))
        top = half * item.place.startswith("bottom") + int(rng.integers(1, half - side))
        draw_shape(draw, item.colour, item.shape, left, top, side)
    return image


def draw_shape(
    draw: ImageDraw.ImageDraw, colour: str, shape: str, left: int, top: int, side: int
) -> None:
    """One shape filling the ``side``-pixel square at (``left``, ``top``), without
    anti-aliasing."""
    right, bottom = left + side - 1, top + side - 1
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)


def scene_record(shapes: list[Shape]) -> dict:
    record: dict = {"caption": {}, "alt_text": {}, "vqa": {}}
    for lang, words in SCENE_WORDS.items():
        located = [
            words.at.format(thing=words.phrase(words.a, s), place=words.places[s.place])
            for s in shapes
        ]
        things = words.join.join(words.phrase(words.a, s) for s in shapes)
        record["caption"][lang] = words.join.join(located)
        record["alt_text"][lang] = words.alt_text.format(things=things)
        record["vqa"][lang] = [[words.how_many, str(len(shapes))]]
        for s in shapes:
            place = words.places[s.place]
            record["vqa"][lang] += [
                [words.which_colour.format(place=place), words.colours[s.colour]],
                [words.which_shape.format(place=place), words.shapes[s.shape]],
                [words.where.format(thing=words.phrase(words.the, s)), place],
            ]
    return record


# --- moving shapes (video) -----------------------------------------------------------------

CLIP_FRAMES, CLIP_FPS = 8, 8.0
# Read every 2nd frame (0, 2, 4, 6, or 1, 3, 5, 7 as training draws): four frames, enough to
# see the motion and the appearance in either.
CLIP_STRIDE_FRAMES = 2
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class ClipStory:
    """What happens in a clip: ``mover`` (colour, shape) moves in ``direction`` and ``newcomer``
    (another colour) appears; ``moves_first`` says which of the two happens first."""

    mover: tuple[str, str]
    direction: str
    newcomer: tuple[str, str]
    moves_first: bool

    def mover_at(self, frame: int) -> int:
        """How many steps the mover has made by ``frame``: three, over frames 1-3 when it moves
        first, else over frames 4-6 (after the newcomer's appearance at frame 2)."""
        start = 0 if self.moves_first else 3
        return min(max(frame - start, 0), 3)

    def newcomer_shown(self, frame: int) -> bool:
        return frame >= (4 if self.moves_first else 2)


def clips(
    count: int, seed: int = 0, image_size_px: int = 64, split: str = "train"
) -> Iterator[Example]:
    """``CLIP_FRAMES`` frames at ``CLIP_FPS`` as mp4: a shape a quarter of the frame wide moves
    three steps of an eighth of the frame along one half of it; a shape of another colour
    appears in the other half."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])  # a stream apart from scenes'
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for i in range(count):
        mover = kinds[int(rng.integers(len(kinds)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        others = [k for k in kinds if k[0] != mover[0]]  # tell the two apart by colour alone
        newcomer = others[int(rng.integers(len(others)))]
        story = ClipStory(mover, direction, newcomer, bool(rng.integers(2)))
        frames = draw_clip(story, image_size_px, rng)
        yield Example(f"clips-{i:09d}", encode_video(frames, CLIP_FPS), "mp4", clip_record(story))


def draw_clip(story: ClipStory, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [CLIP_FRAMES, size, size, 3]. The mover keeps to one half (top or bottom for
    left/right, left or right for up/down), the newcomer is in the other."""
    side, step, half = size // 4, size // 8, size // 2
    dx, dy = DIRECTIONS[story.direction]
    travel = int(rng.integers(1, size - side - 3 * step))  # along the motion, room for 3 steps
    across = int(rng.integers(1, half - side))  # within its half
    mover_half, newcomer_along = int(rng.integers(2)), int(rng.integers(1, size - side))
    newcomer_across = int(rng.integers(1, half - side)) + half * (1 - mover_half)
    start = travel if dx + dy > 0 else travel + 3 * step  # moving back: start 3 steps further on
    frames = []
    for t in range(CLIP_FRAMES):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        along, at = start + (dx + dy) * step * story.mover_at(t), across + half * mover_half
        draw_shape(draw, *story.mover, *((along, at) if dx else (at, along)), side)
        if story.newcomer_shown(t):
            xy = (newcomer_along, newcomer_across) if dx else (newcomer_across, newcomer_along)
            draw_shape(draw, *story.newcomer, *xy, side)
        frames.append(np.asarray(image))
    return np.stack(frames)


def clip_record(story: ClipStory) -> dict:
    """English captions and questions: what moves where, what appears, and in which order."""
    mover, newcomer = " ".join(story.mover), " ".join(story.newcomer)
    moves, appears = f"a {mover} moves {story.direction}", f"a {newcomer} appears"
    first, then = (moves, appears) if story.moves_first else (appears, moves)
    return {
        "caption": {"en": f"{first} then {then}"},  # no comma: the tokenizer has never seen one
        "vqa": {
            "en": [
                [f"which way does the {mover} move?", story.direction],
                ["what appears?", f"a {newcomer}"],
                ["what moves?", f"a {mover}"],
                [f"does the {mover} move first?", "yes" if story.moves_first else "no"],
            ]
        },
    }


# --- rendered text --------------------------------------------------------------------------

OCR_WORDS = {
    "en": "cat dog house tree water light open stop exit coffee book train music garden bread sun",
    "de": "Haus Baum Straße Brücke Käse Tür Größe Grüße Bäckerei Ausgang offen Zug Fluss Vogel "
    "Bär Schule",
    "ru": "дом кот мир вода хлеб улица выход книга солнце река поезд школа чай лес море город",
    "el": "σπίτι γάτα νερό ήλιος δρόμος έξοδος βιβλίο θάλασσα ψωμί τρένο σχολείο καφές πόλη "
    "δέντρο μουσική φως",
}
FONT = "fonts/ttf/DejaVuSans.ttf"  # under matplotlib's data path; covers Latin, Cyrillic, Greek


def text_images(
    count: int, seed: int = 0, image_size_px: int = 64, split: str = "train"
) -> Iterator[Example]:
    """1-3 distinct words of one language (en, de, ru, el), one per line, dark on a light
    background, as PNG; the ``ocr`` target joins the lines with spaces."""
    rng = _rng(seed, split)
    for i in range(count):
        lang = OCR_LANGUAGES[int(rng.integers(len(OCR_LANGUAGES)))]
        vocabulary = OCR_WORDS[lang].split()
        chosen = rng.choice(len(vocabulary), size=int(rng.integers(1, 4)), replace=False)
        words = [vocabulary[k] for k in chosen]
        image = draw_text(words, image_size_px, rng)
        record = {"ocr": {lang: " ".join(words)}}
        yield Example(f"text-{i:09d}", _encode(image, "png"), "png", record)


def draw_text(lines: list[str], size: int, rng: np.random.Generator) -> Image.Image:
    """``lines`` centred in the largest DejaVu Sans size that fits 90% of the image."""
    background = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font = _fitting_font(lines, int(size * 0.9))
    line_height = sum(font.getmetrics())
    top = (size - line_height * len(lines)) // 2
    for row, line in enumerate(lines):
        left = (size - font.getlength(line)) / 2
        draw.text((left, top + row * line_height), line, font=font, fill=ink)
    return image


def _fitting_font(lines: list[str], room: int) -> ImageFont.FreeTypeFont:
    for points in range(room // 2, 1, -1):
        font = _font(points)
        fits_height = sum(font.getmetrics()) * len(lines) <= room
        if fits_height and max(font.getlength(line) for line in lines) <= room:
            return font
    raise ValueError(f"{lines} cannot be drawn legibly in {room} pixels")


@lru_cache(maxsize=None)
def _font(points: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # only for the path of the DejaVu Sans it ships

    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), FONT)), points)


# --- handwritten digits ---------------------------------------------------------------------

NUMBER_WORDS = {
    "en": "zero one two three four five six seven eight nine",
    "de": "null eins zwei drei vier fünf sechs sieben acht neun",
    "fr": "zéro un deux trois quatre cinq six sept huit neuf",
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve",
}
DIGIT_TEXTS = {  # caption, alt_text, "which digit?", "even or odd?", (even, odd)
    "en": (
        "a handwritten digit {word}",
        "a scan of the handwritten digit {word}",
        "which digit is this?",
        "is the digit even or odd?",
        ("even", "odd"),
    ),
    "de": (
        "eine handgeschriebene Ziffer {word}",
        "ein Scan der handgeschriebenen Ziffer {word}",
        "welche Ziffer ist das?",
        "ist die Ziffer gerade oder ungerade?",
        ("gerade", "ungerade"),
    ),
    "fr": (
        "un chiffre {word} écrit à la main",
        "un scan du chiffre {word} écrit à la main",
        "quel est ce chiffre ?",
        "ce chiffre est-il pair ou impair ?",
        ("pair", "impair"),
    ),
    "es": (
        "un dígito {word} escrito a mano",
        "un escaneo del dígito {word} escrito a mano",
        "¿qué dígito es este?",
        "¿el dígito es par o impar?",
        ("par", "impar"),
    ),
}


def digits(
    count: int, seed: int = 0, image_size_px: int = 64, split: str = "train"
) -> Iterator[Example]:
    """scikit-learn's 1797 scanned 8x8 digits (UCI), dark ink on white, upscaled bilinearly to
    ``image_size_px``, as JPEG. Each pass over them is a fresh permutation; the key ends with the
    index into ``load_digits()`` so a sample can be traced to its scan."""
    images, labels = _sklearn_digits()
    rng = _rng(seed, split)
    pool = np.array([i for i in range(len(images)) if (i % 5 == 0) == (split == "held_out")])
    passes = range(-(-count // len(pool)))  # ceil(count / len(pool))
    order = [int(pool[k]) for _ in passes for k in rng.permutation(len(pool))]
    for i, index in enumerate(order[:count]):
        ink = Image.fromarray(images[index]).resize((image_size_px,) * 2, Image.Resampling.BILINEAR)
        yield Example(
            f"digits-{i:09d}-{index:04d}",
            _encode(ink.convert("RGB"), "jpg"),
            "jpg",
            digit_record(int(labels[index])),
        )


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] uint8 with 255 = paper, labels [1797])."""
    from sklearn.datasets import load_digits  # slow to import; only the digits need it

    data = load_digits()
    return (255 - data.images * 255 / 16).round().astype(np.uint8), data.target


def digit_record(label: int) -> dict:
    record: dict = {"caption": {}, "alt_text": {}, "vqa": {}}
    for lang, (caption, alt_text, which, parity, answers) in DIGIT_TEXTS.items():
        word = NUMBER_WORDS[lang].split()[label]
        record["caption"][lang] = caption.format(word=word)
        record["alt_text"][lang] = alt_text.format(word=word)
        record["vqa"][lang] = [[which, str(label)], [parity, answers[label % 2]]]
    return record


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the corpus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSource:
    generator: Callable[[int, int, int, str], Iterator[Example]]
    languages: tuple[str, ...]
    weights: dict[str, float]  # task -> default mixture weight; the keys are the tasks served

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.weights)


SOURCES = {
    "scenes": DemoSource(
        scenes, EUROPEAN, {"caption": 1.0, "alt_text": 0.5, "split_caption": 0.5, "vqa": 1.0}
    ),
    "text": DemoSource(text_images, OCR_LANGUAGES, {"ocr": 1.0}),
    "digits": DemoSource(digits, EUROPEAN, {"caption": 0.5, "alt_text": 0.25, "vqa": 0.5}),
}
# Written only when asked for (``video_samples``), and kept out of ``DemoCorpus.sources()``: a
# mixture with a video source makes every sample a clip, which the image stages do not want.
VIDEO_SOURCES = {"clips": DemoSource(clips, ("en",), {"video_caption": 1.0, "video_qa": 1.0})}


@dataclass(frozen=True)
class DemoCorpus:
    """A built corpus: where it is, its tokenizer, and each source's manifest."""

    out_dir: Path
    tokenizer_path: Path
    manifests: dict[str, Manifest]  # source name -> its manifest, shards in out_dir/<name>
    video_manifests: dict[str, Manifest] = field(default_factory=dict)  # likewise, VIDEO_SOURCES

    def sources(self, tasks_weights: dict[str, float] | None = None) -> tuple[SourceConfig, ...]:
        """One mixture entry per (source, task), named ``<source>_<task>``. ``tasks_weights``
        overrides default weights by entry name ("scenes_vqa") or by task ("vqa": every source
        serving it); the entry name wins."""
        weights = tasks_weights or {}

        def weight(name: str, task: str) -> float:
            return weights.get(f"{name}_{task}", weights.get(task, SOURCES[name].weights[task]))

        entries = tuple(
            self._entry(name, manifest, task, weight=weight(name, task))
            for name, manifest in self.manifests.items()
            for task in manifest.tasks
        )
        unknown = set(weights) - {e.name for e in entries} - {e.task for e in entries}
        if unknown:
            raise ValueError(f"tasks_weights: no demo source or task named {sorted(unknown)}")
        return entries

    def video_sources(self) -> tuple[SourceConfig, ...]:
        """The video entries (``clips_video_caption``, ``clips_video_qa``), reading every
        ``CLIP_STRIDE_FRAMES``-th frame; empty unless the corpus was built with videos."""
        stride = {"frame_stride_frames": CLIP_STRIDE_FRAMES}
        return tuple(
            self._entry(name, manifest, task, weight=VIDEO_SOURCES[name].weights[task], **stride)
            for name, manifest in self.video_manifests.items()
            for task in manifest.tasks
        )

    def _entry(self, name: str, manifest: Manifest, task: str, **options) -> SourceConfig:
        shards = str(self.out_dir / name / manifest.pattern)
        return SourceConfig(f"{name}_{task}", shards, task, languages=manifest.languages, **options)


def build_demo_corpus(
    out_dir: str | Path,
    seed: int = 0,
    samples_per_source: int = 512,
    samples_per_shard: int = 64,
    image_size_px: int = 64,
    vocab_size: int = 1000,
    split: str = "train",
    video_samples: int = 0,
) -> DemoCorpus:
    """Generate every source, train a BPE tokenizer on all their prompts and targets
    (``out_dir/tokenizer.model``), then write each source's shards to ``out_dir/<name>``; with
    ``video_samples``, that many clips of each video source too. The clips' texts are not in
    the tokenizer's training text (their words and letters are the scenes' and English's), so a
    build with videos has the same tokenizer and image shards as one without."""
    out_dir = Path(out_dir).resolve()
    examples = {
        name: list(source.generator(samples_per_source, seed, image_size_px, split))
        for name, source in SOURCES.items()
    }
    tokenizer_path = out_dir / "tokenizer.model"
    # BPE: on a corpus this small a unigram model stays near character level.
    train_tokenizer(
        texts=corpus_text(examples, seed),
        vocab_size=vocab_size,
        model_path=tokenizer_path,
        model_type="bpe",
    )

    def write(name: str, source: DemoSource, examples: Iterable[Example]) -> Manifest:
        return write_source(
            examples,
            out_dir / name,
            name,
            tasks=source.tasks,
            languages=source.languages,
            max_samples_per_shard=samples_per_shard,
            tokenizer=f"../{tokenizer_path.name}",  # relative: the corpus can be moved
        )

    manifests = {name: write(name, source, examples[name]) for name, source in SOURCES.items()}
    videos = {
        name: write(name, source, source.generator(video_samples, seed, image_size_px, split))
        for name, source in VIDEO_SOURCES.items()
        if video_samples
    }
    return DemoCorpus(out_dir, tokenizer_path, manifests, videos)


def corpus_text(examples: dict[str, list[Example]], seed: int = 0) -> Iterator[str]:
    """Every text in the records, and for each record the prompt of every task and language its
    source serves, as the mixture would render it."""
    rng = np.random.default_rng(seed)
    for name, source in SOURCES.items():
        for example in examples[name]:
            yield from _strings(example.record)
            for task in source.tasks:
                field = example.record[TASKS[task].record_field]
                for lang in field:
                    yield format_example(task, example.record, [lang], rng)[0]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# What `make demo` and a bare `launcher/run.py --stage S` train and evaluate on (folder: options).
DEMO_CORPORA = {
    "runs/demo_corpus": {"samples_per_source": 2048, "samples_per_shard": 256,
                         "video_samples": 512},
    "runs/demo_eval": {"samples_per_source": 256, "split": "held_out", "video_samples": 128},
}  # fmt: skip


def build_demo_corpora(root: str | Path = ".", only_missing: bool = False) -> list[DemoCorpus]:
    """The corpora of ``DEMO_CORPORA`` under ``root``, each built in a temporary folder and
    renamed into place, so a corpus is either whole or absent. ``only_missing``: leave alone
    those already there. Local processes that call this at once take turns (a file lock)."""
    root = Path(root)
    root.joinpath("runs").mkdir(parents=True, exist_ok=True)
    built = []
    with open(root / "runs" / ".demo_corpora.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for folder, options in DEMO_CORPORA.items():
            out = root / folder
            if only_missing and out.is_dir():
                continue
            tmp = out.with_name(f".tmp-{out.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            corpus = build_demo_corpus(tmp, **options)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            where = out.resolve()
            built.append(replace(corpus, out_dir=where, tokenizer_path=where / "tokenizer.model"))
    return built


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.data_pipeline.demo_corpus", __doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output folder")
    target.add_argument("--demo", action="store_true", help=f"both of {', '.join(DEMO_CORPORA)}")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--samples-per-source", type=int, default=512, help="examples per source")
    parser.add_argument("--samples-per-shard", type=int, default=64, help="examples per shard")
    parser.add_argument("--image-size-px", type=int, default=64, help="square images, this wide")
    parser.add_argument("--vocab-size", type=int, default=1000, help="the tokenizer's upper bound")
    parser.add_argument("--split", choices=SPLITS, default="train", help="held_out: for evaluation")
    parser.add_argument("--video-samples", type=int, default=0,
                        help="clips of moving shapes to write too (0: none)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.demo:
        corpora = build_demo_corpora()
    else:
        corpora = [build_demo_corpus(args.out, args.seed, args.samples_per_source,
                                     args.samples_per_shard, args.image_size_px, args.vocab_size,
                                     args.split, args.video_samples)]  # fmt: skip
    for corpus in corpora:
        describe(corpus)
    print(f"built in {time.perf_counter() - start:.1f} s")


def describe(corpus: DemoCorpus) -> None:
    for name, manifest in (corpus.manifests | corpus.video_manifests).items():
        print(
            f"{name}: {manifest.samples} samples in {len(manifest.shards)} shards "
            f"({', '.join(manifest.tasks)}; {', '.join(manifest.languages)}) "
            f"-> {corpus.out_dir / name / manifest.pattern}"
        )
    vocab = Tokenizer.load(corpus.tokenizer_path).vocab_size
    print(f"tokenizer: {corpus.tokenizer_path} ({vocab} pieces)")


if __name__ == "__main__":
    main()
