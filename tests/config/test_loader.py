"""Config loading: composition, overrides, round trips, and bad configs refused with an error that
names the file and the dotted field."""

from pathlib import Path

import pytest
import yaml

from pali3_train.config import (
    Config,
    ConfigError,
    ViTConfig,
    config_from_dict,
    dump_config,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted((CONFIGS / "models").glob("*.yaml")) + sorted(
    (CONFIGS / "mixtures").glob("*.yaml")
)


def _write(directory: Path, name: str, data) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", [*PRESETS, *sorted(CONFIGS.glob("*.yaml"))], ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_includes_compose_and_the_including_file_wins(tmp_path):
    _write(tmp_path, "model.yaml", {"model": {"vit": {"width": 96, "num_heads": 6}}})
    _write(tmp_path, "base.yaml", {"train": {"lr": 0.5, "steps": 10, "warmup_steps": 0}})
    stage = _write(
        tmp_path,
        "stage.yaml",
        {
            "include": ["base.yaml", "model.yaml"],
            "model": {"vit": {"depth": 3}},
            "train": {"lr": 0.25},
        },
    )
    cfg = load_config(stage)
    assert (cfg.model.vit.width, cfg.model.vit.num_heads, cfg.model.vit.depth) == (96, 6, 3)
    assert (cfg.train.lr, cfg.train.steps) == (0.25, 10)
    assert cfg.model.vit.mlp_dim == ViTConfig().mlp_dim  # untouched fields keep their defaults


def test_command_line_overrides_apply_last_and_are_typed(tmp_path):
    stage = _write(tmp_path, "stage.yaml", {"train": {"lr": 0.5}})
    cfg = load_config(
        stage,
        ["train.lr=1e-4", "train.adam_betas=[0.8, 0.95]", "parallel.activation_checkpointing=true"],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.adam_betas == (0.8, 0.95)
    assert cfg.parallel.activation_checkpointing is True


STAGES = sorted(
    p
    for p in CONFIGS.glob("*/*.yaml")
    if p.parent.name in ("tiny", "pali3_5b") and p.name != "curriculum.yaml"
)


@pytest.mark.parametrize("path", [*STAGES, *PRESETS], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dump_and_reload_gives_an_equal_config(path, tmp_path):
    cfg = load_config(path)
    again = load_config(_write(tmp_path, "dumped.yaml", dump_config(cfg)))
    assert again == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


# (name, file contents, overrides, expected dotted field, words the message must contain)
BAD = [
    (
        "unknown key with suggestion",
        {"model": {"vit": {"widht": 64}}},
        [],
        "model.vit.widht",
        "did you mean 'width'",
    ),
    ("unknown section", {"trian": {"lr": 0.1}}, [], "trian", "did you mean 'train'"),
    (
        "wrong type: string for int",
        {"model": {"vit": {"depth": "twelve"}}},
        [],
        "model.vit.depth",
        "must be an integer",
    ),
    (
        "wrong type: float for int",
        {"train": {"steps": 10.5}},
        [],
        "train.steps",
        "must be an integer",
    ),
    (
        "wrong type: bool for int",
        {"parallel": {"zero_stage": True}},
        [],
        "parallel.zero_stage",
        "must be an integer",
    ),
    (
        "wrong type: int for bool",
        {"parallel": {"activation_checkpointing": 1}},
        [],
        "parallel.activation_checkpointing",
        "true or false",
    ),
    ("section is not a mapping", {"train": 5}, [], "train", "must be a mapping"),
    (
        "heads do not divide width",
        {"model": {"vit": {"width": 100, "num_heads": 16}}},
        [],
        "model.vit.num_heads",
        "does not divide width=100",
    ),
    (
        "patch does not divide image",
        {"model": {"vit": {"image_size_px": 224, "patch_size_px": 15}}},
        [],
        "model.vit.patch_size_px",
        "patch_size_px=15 does not divide image_size_px=224",
    ),
    ("negative lr", {"train": {"lr": -0.001}}, [], "train.lr", "must be > 0"),
    ("lr not a number", {"train": {"lr": "fast"}}, [], "train.lr", "must be a number"),
    (
        "literal out of choices",
        {"model": {"ul2": {"feed_forward": "relu"}}},
        [],
        "model.ul2.feed_forward",
        "'gated-gelu', 'gated-silu'",
    ),
    (
        "zero stage out of range",
        {"parallel": {"zero_stage": 4}},
        [],
        "parallel.zero_stage",
        "one of 0, 1, 2, 3",
    ),
    (
        "micro batch does not divide global",
        {"train": {"global_batch_size": 10, "micro_batch_size": 4}},
        [],
        "train.micro_batch_size",
        "does not divide global_batch_size=10",
    ),
    (
        "warmup longer than training",
        {"train": {"steps": 10, "warmup_steps": 20}},
        [],
        "train.warmup_steps",
        "exceeds steps=10",
    ),
    ("beta out of range", {"train": {"adam_betas": [0.9, 1.5]}}, [], "train.adam_betas", "[0, 1)"),
    (
        "wrong tuple length",
        {"train": {"adam_betas": [0.9]}},
        [],
        "train.adam_betas",
        "must have 2 items",
    ),
    (
        "text heads do not divide width",
        {"model": {"text": {"width": 30, "num_heads": 4}}},
        [],
        "model.text.num_heads",
        "does not divide width=30",
    ),
    (
        "pad id outside vocabulary",
        {"model": {"ul2": {"vocab_size": 100, "pad_id": 100}}},
        [],
        "model.ul2.pad_id",
        "[0, vocab_size=100)",
    ),
    (
        "tensor parallel does not divide heads",
        {"parallel": {"tensor_parallel_size": 3}},
        [],
        "model.ul2.num_heads",
        "not divisible by parallel.tensor_parallel_size=3",
    ),
    ("zero sized layer", {"model": {"ul2": {"d_ff": 0}}}, [], "model.ul2.d_ff", "must be > 0"),
    ("negative read retries", {"data": {"read_retries": -1}}, [], "data.read_retries", ">= 0"),
    (
        "negative retry delay",
        {"data": {"read_retry_delay_s": -0.5}},
        [],
        "data.read_retry_delay_s",
        "must be >= 0, got -0.5",
    ),
    (
        "unknown task in the mixture",
        {"data": {"sources": [{"name": "a", "shards": "a.tar", "task": "captioning"}]}},
        [],
        "data.sources[0].task",
        "'caption', 'alt_text'",
    ),
    (
        "mixture with zero total weight",
        {"data": {"sources": [{"name": "a", "shards": "a.tar", "task": "ocr", "weight": 0}]}},
        [],
        "data.sources",
        "total weight is 0",
    ),
    (
        "source without shards",
        {"data": {"sources": [{"name": "a", "task": "ocr"}]}},
        [],
        "data.sources[0].shards",
        "missing (required)",
    ),
    (
        "negative source weight",
        {"data": {"sources": [{"name": "a", "shards": "a", "task": "vqa", "weight": -1}]}},
        [],
        "data.sources[0].weight",
        "must be >= 0",
    ),
    ("too many frames", {"data": {"max_frames": 17}}, [], "data.max_frames", "[1, 16], got 17"),
    (
        "a frame stride on an image task",
        {
            "data": {
                "sources": [
                    {"name": "a", "shards": "a", "task": "caption", "frame_stride_frames": 2}
                ]
            }
        },
        [],
        "data.sources[0].frame_stride_frames",
        "is read only by video tasks, not caption",
    ),
    (
        "a video task without a frame stride",
        {"data": {"sources": [{"name": "a", "shards": "a", "task": "video_qa"}]}},
        [],
        "data.sources[0].frame_stride_s",
        "needs exactly one of frame_stride_s and frame_stride_frames",
    ),
    (
        "a video task with both frame strides",
        {
            "data": {
                "sources": [
                    {
                        "name": "a",
                        "shards": "a",
                        "task": "video_caption",
                        "frame_stride_s": 1.0,
                        "frame_stride_frames": 2,
                    }
                ]
            }
        },
        [],
        "data.sources[0].frame_stride_s",
        "needs exactly one of",
    ),
    (
        "a zero frame stride",
        {
            "data": {
                "sources": [
                    {"name": "a", "shards": "a", "task": "video_caption", "frame_stride_s": 0}
                ]
            }
        },
        [],
        "data.sources[0].frame_stride_s",
        "must be finite and > 0, got 0",
    ),
    (
        "an infinite frame stride",
        {
            "data": {
                "sources": [
                    {
                        "name": "a",
                        "shards": "a",
                        "task": "video_caption",
                        "frame_stride_s": float("inf"),
                    }
                ]
            }
        },
        [],
        "data.sources[0].frame_stride_s",
        "must be finite and > 0, got inf",
    ),
    (
        "duplicate source names",
        {
            "data": {
                "sources": [
                    {"name": "a", "shards": "a.tar", "task": "vqa"},
                    {"name": "a", "shards": "b.tar", "task": "ocr"},
                ]
            }
        },
        [],
        "data.sources[1].name",
        "duplicate source 'a'",
    ),
]


@pytest.mark.parametrize("name,data,overrides,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused_naming_file_and_field(tmp_path, name, data, overrides, field, words):
    path = _write(tmp_path, "bad.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert info.value.field_path == field
    assert message.startswith(f"{path}: {field}: "), message
    assert words in message, message


def test_the_error_names_the_included_file_the_bad_value_came_from(tmp_path):
    model = _write(tmp_path, "model.yaml", {"model": {"vit": {"width": 100, "num_heads": 16}}})
    stage = _write(tmp_path, "stage.yaml", {"include": "model.yaml", "train": {"lr": 0.1}})
    with pytest.raises(ConfigError) as info:
        load_config(stage)
    assert info.value.source == str(model.resolve())


@pytest.mark.parametrize(
    "override,field,words",
    [
        ("model.vit.depht=3", "model.vit.depht", "did you mean 'depth'"),
        ("train.lr=-1", "train.lr", "must be > 0"),
        ("model.vit=3", "model.vit", "must be a mapping"),
    ],
)
def test_bad_override_names_the_override(tmp_path, override, field, words):
    path = _write(tmp_path, "ok.yaml", {})
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert info.value.source == f"--set {override}"
    assert info.value.field_path == field and words in str(info.value)


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.global_batch_size=6", "train.micro_batch_size"),  # micro 4 no longer divides it
        ("train.steps=1", "train.warmup_steps"),  # warmup 2 now exceeds it
        ("model.vit.width=66", "model.vit.num_heads"),  # 4 heads do not divide 66
        ("parallel.tensor_parallel_size=3", "model.ul2.num_heads"),
        ("model.ul2.vocab_size=1", "model.ul2.eos_id"),  # eos 1 is not a token id below 1
        ("stage.name='0'", "stage.objective"),  # the file's generative is not stage 0's
        ("model.vit.image_size_px=33", "model.vit.patch_size_px"),
        ("model.ul2.pad_id=1", "model.ul2.eos_id"),  # now equal
    ],
)
def test_a_rule_between_fields_names_the_set_item_that_broke_it(tmp_path, override, field):
    """The rule names one field, but the value that changed came from --set: the error names
    that item, not the file that gave the field the rule reports (issue 15)."""
    base = _write(tmp_path, "base.yaml", {
        "model": {
            "vit": {"width": 64, "num_heads": 4, "image_size_px": 32, "patch_size_px": 8},
            "ul2": {"num_heads": 4, "pad_id": 0, "eos_id": 1},
        },
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "steps": 6, "warmup_steps": 2},
        "stage": {"objective": "generative"},
    })  # fmt: skip
    stage = _write(tmp_path, "stage.yaml", {"include": "base.yaml"})
    with pytest.raises(ConfigError) as info:
        load_config(stage, [override])
    assert info.value.source == f"--set {override}", (str(info.value), base)
    assert info.value.field_path == field


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = _write(tmp_path, "bad.yaml", "train:\n  steps: 6\n  lr: [1e-3\nparallel: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path.resolve()}:4:9: invalid YAML: ")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "ok.yaml", {}), ["train.adam_betas=[0.9"])
    assert str(info.value).startswith("--set train.adam_betas=[0.9: train.adam_betas: invalid")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "contents,words",
    [
        ("model: [unclosed", "invalid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("include: [missing.yaml]\n", "no such config file"),
        ("include: [self.yaml]\n", "include cycle"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, contents, words):
    path = _write(tmp_path, "self.yaml", contents)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_config(path)


def test_malformed_override_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(_write(tmp_path, "ok.yaml", {}), ["train.lr"])


def test_a_second_zero_shot_task_on_one_source_is_refused():
    """Metrics are named by source: a second task would silently overwrite the first's."""
    task = "{source: digits_caption, classes: [one, two]}"
    with pytest.raises(ConfigError, match=r"eval.zero_shot\[1\].source: 'digits_caption' has a"):
        load_config(CONFIGS / "tiny/stage0.yaml", [f"eval.zero_shot=[{task}, {task}]"])
