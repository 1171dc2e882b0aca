"""The typed shape of a pali3-train configuration: one frozen dataclass per concern.

Every field has a documented default so that a preset file only states what differs. Each class
checks its own invariants in ``__post_init__`` and reports the offending field by name; the loader
turns that into an error naming the file the value came from and the full dotted path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pali3_train.stages.curriculum import CURRICULUM, OBJECTIVE_NAMES


class FieldError(ValueError):
    """An invalid value, identified by its dotted path relative to the dataclass that raised it;
    ``also``: the other fields a rule between fields read (the loader names whichever of them
    a ``--set`` item gave)."""

    def __init__(self, field_path: str, message: str, also: tuple[str, ...] = ()):
        super().__init__(message)
        self.field_path = field_path
        self.message = message
        self.also = also


def require(condition: bool, field_path: str, message: str, also: tuple[str, ...] = ()) -> None:
    if not condition:
        raise FieldError(field_path, message, also)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, name, f"must be > 0, got {value}")


def _divides(obj: object, width_name: str, heads_name: str) -> None:
    width, heads = getattr(obj, width_name), getattr(obj, heads_name)
    require(
        width % heads == 0,
        heads_name,
        f"{heads_name}={heads} does not divide {width_name}={width}",
        (width_name,),
    )


# ----------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP vision transformer. The default is SigLIP So400m/14 at 224 px."""

    image_size_px: int = 224
    patch_size_px: int = 14
    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(
            self,
            "image_size_px",
            "patch_size_px",
            "width",
            "depth",
            "num_heads",
            "mlp_dim",
            "layer_norm_eps",
        )
        _divides(self, "width", "num_heads")
        require(
            self.image_size_px % self.patch_size_px == 0,
            "patch_size_px",
            f"patch_size_px={self.patch_size_px} does not divide "
            f"image_size_px={self.image_size_px}",
            ("image_size_px",),
        )

    @property
    def grid_size(self) -> int:
        return self.image_size_px // self.patch_size_px

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class TextConfig:
    """SigLIP text tower (stage 0 only). Its head projects to the image embedding's size,
    ``vit.width``, so that the two can be compared."""

    vocab_size: int = 32000
    max_len: int = 64
    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "max_len",
            "width",
            "depth",
            "num_heads",
            "mlp_dim",
            "layer_norm_eps",
        )
        _divides(self, "width", "num_heads")


@dataclass(frozen=True)
class UL2Config:
    """T5 v1.1-style encoder-decoder (UL2). The default is T5 v1.1 XL's shape."""

    vocab_size: int = 32128
    d_model: int = 2048
    num_heads: int = 32
    d_kv: int = 64
    d_ff: int = 5120
    num_encoder_layers: int = 24
    num_decoder_layers: int = 24
    feed_forward: Literal["gated-gelu", "gated-silu"] = "gated-silu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 1

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "d_model",
            "num_heads",
            "d_kv",
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "layer_norm_eps",
        )
        for name in ("pad_id", "eos_id"):
            value = getattr(self, name)
            require(
                0 <= value < self.vocab_size,
                name,
                f"must be a token id in [0, vocab_size={self.vocab_size}), got {value}",
                ("vocab_size",),
            )
        require(self.pad_id != self.eos_id, "eos_id", "must differ from pad_id", ("pad_id",))


@dataclass(frozen=True)
class ModelConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    ul2: UL2Config = field(default_factory=UL2Config)
    # A learned embedding per frame position (at most 16 frames) added to a video's visual
    # tokens, so the encoder can tell frames apart beyond their order; PaLI-3 uses none.
    temporal_embedding: bool = False


# ------------------------------------------------------------------------------------------ data


TaskName = Literal[
    "caption", "alt_text", "split_caption", "vqa", "ocr", "video_caption", "video_qa"
]
# Tasks whose samples are videos (a clip of up to data.max_frames frames), not images.
VIDEO_TASKS = frozenset({"video_caption", "video_qa"})
MAX_FRAMES = 16  # PaLI-3's video transfers sample at most 16 frames
ShardFormat = Literal["pali3", "img2dataset"]


@dataclass(frozen=True)
class FieldMapping:
    """Where a ``format: img2dataset`` source keeps its text and language (``data_pipeline/
    formats.py``). ``text``: a member of the sample by its extension (``txt``, the caption file
    img2dataset writes) or a key of its JSON metadata (``json:caption``). ``language``: a fixed
    code, a JSON key (``json:lang``), or unset for the source's first language."""

    text: str = "txt"
    language: str | None = None

    def __post_init__(self) -> None:
        require(
            bool(self.text.removeprefix("json:").strip()), "text", f"{self.text!r} names nothing"
        )
        if self.language is not None:
            key = self.language.removeprefix("json:").strip()
            require(bool(key), "language", f"{self.language!r} names nothing")


@dataclass(frozen=True)
class SourceConfig:
    """One entry of the task mixture: shards read with one task's prompt format.

    ``shards`` is anything webdataset opens: a path, a brace pattern
    (``shards-{000000..000127}.tar``) or a ``pipe:`` command that streams a tar (``pipe:aws s3 cp
    s3://bucket/shard-000000.tar -``); or a local folder: the shards its ``manifest.json`` lists
    (what ``write_shards`` wrote), else every ``.tar`` in it (an img2dataset download). ``prompt``
    overrides the task's default template.
    """

    name: str
    shards: str
    task: TaskName
    weight: float = 1.0
    languages: tuple[str, ...] = ("en",)
    prompt: str | None = None
    # How a sample's tar members become a record: ``pali3`` (what write_shards writes: the
    # record as .json) or ``img2dataset`` (image + .txt caption + .json metadata, as LAION,
    # DataComp and CC12M downloads come), read through ``fields``.
    format: ShardFormat = "pali3"
    fields: FieldMapping | None = None
    # Video tasks: the fixed time between the frames sampled from a video, in seconds or in
    # frames; exactly one of them (``docs/video.md``).
    frame_stride_s: float | None = None
    frame_stride_frames: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        require(bool(self.shards.strip()), "shards", "must not be empty")
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        require(len(self.languages) > 0, "languages", "must list at least one language")
        if self.format == "pali3":
            require(self.fields is None, "fields", "is read only with format: img2dataset")
        elif self.fields is not None and (lang := self.fields.language) is not None:
            require(
                lang.startswith("json:") or lang in self.languages,
                "fields.language",
                f"{lang!r} is not among languages {list(self.languages)}",
                ("languages",),
            )
        self._check_frame_stride()
        if self.format == "img2dataset" and self.task in ("vqa", "video_qa"):
            require(
                False,
                "task",
                f"{self.task} needs question/answer records: use format: pali3 "
                "(python -m pali3_train.data_pipeline.write_shards --vqav2-questions ...)",
                ("format",),
            )

    def _check_frame_stride(self) -> None:
        strides = ("frame_stride_s", "frame_stride_frames")
        given = [name for name in strides if getattr(self, name) is not None]
        if self.task not in VIDEO_TASKS:
            for name in given:
                require(False, name, f"is read only by video tasks, not {self.task}", ("task",))
            return
        require(
            len(given) == 1,
            "frame_stride_s",
            f"task {self.task} needs exactly one of frame_stride_s and frame_stride_frames",
            ("frame_stride_frames", "task"),
        )
        value = getattr(self, given[0])
        require(
            math.isfinite(value) and value > 0, given[0], f"must be finite and > 0, got {value}"
        )


@dataclass(frozen=True)
class DataConfig:
    """The task mixture and how it is read; the image resolution is model.vit.image_size_px, so a
    stage that raises the resolution changes only the model section."""

    tokenizer_path: str | None = None
    max_prompt_tokens: int = 64
    max_target_tokens: int = 64
    sources: tuple[SourceConfig, ...] = ()
    # Shards each DataLoader worker reads at once per source, drawing samples from them in turn:
    # mixes samples within a source without a shuffle buffer, which could not be resumed exactly.
    open_shards_per_source: int = 2
    num_workers: int = 2
    # Stop when more than this fraction of the samples a worker has read were unusable (checked
    # once the worker has read ``skip_check_min_samples``), naming the shard with most skips.
    max_skip_fraction: float = 0.05
    skip_check_min_samples: int = 200
    # A remote shard (pipe:, http) whose read fails is reopened this many times, after
    # read_retry_delay_s, then twice that, ..., and continued after the samples it already gave,
    # before it counts as unreadable: a network blip loses no samples. Local files are not retried.
    read_retries: int = 3
    read_retry_delay_s: float = 1.0
    # Append the key, source and epoch of every sample a data-parallel rank trains on to
    # <run_dir>/served_keys/dp<rank>.jsonl, one line per batch: an audit of what the run read
    # (each sample once per epoch, across resumes and resharding). A run killed between
    # checkpoints logs again the batches it replays after resuming.
    log_served_keys: bool = False
    # Frames per video sample (1..16). A mixture with a video source makes every sample a clip
    # of this many frames, real ones first and the rest masked; an image is a one-frame clip.
    max_frames: int = MAX_FRAMES

    def __post_init__(self) -> None:
        _positive(self, "max_prompt_tokens", "max_target_tokens", "open_shards_per_source")
        require(
            1 <= self.max_frames <= MAX_FRAMES,
            "max_frames",
            f"must be in [1, {MAX_FRAMES}], got {self.max_frames}",
        )
        _positive(self, "skip_check_min_samples")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.read_retries >= 0, "read_retries", f"must be >= 0, got {self.read_retries}")
        require(
            self.read_retry_delay_s >= 0,
            "read_retry_delay_s",
            f"must be >= 0, got {self.read_retry_delay_s}",
        )
        require(
            0 <= self.max_skip_fraction <= 1,
            "max_skip_fraction",
            f"must be in [0, 1], got {self.max_skip_fraction}",
        )
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            require(names.index(name) == i, f"sources[{i}].name", f"duplicate source {name!r}")
        if self.sources:
            require(
                sum(s.weight for s in self.sources) > 0,
                "sources",
                "the total weight is 0: give at least one source a positive weight",
            )


def has_video(data: DataConfig) -> bool:
    """Whether any source of the mixture is a video task: then every batch is clips
    ([B, data.max_frames, 3, S, S] with a frame mask), images included."""
    return any(s.task in VIDEO_TASKS for s in data.sources)


# ------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 8
    lr: float = 1e-4
    lr_schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    # A micro-batch whose loss is NaN/inf on any rank is dropped (no backward) and counted; this
    # many in a row stop the run, since by then the weights or the data are broken.
    max_bad_losses_in_a_row: int = 5
    log_every_steps: int = 1

    def __post_init__(self) -> None:
        _positive(self, "steps", "global_batch_size", "micro_batch_size", "lr", "adam_eps")
        _positive(self, "max_bad_losses_in_a_row", "log_every_steps")
        for name in ("warmup_steps", "weight_decay", "grad_clip_norm"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(
            self.warmup_steps <= self.steps,
            "warmup_steps",
            f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}",
            ("steps",),
        )
        require(
            all(0.0 <= b < 1.0 for b in self.adam_betas),
            "adam_betas",
            f"each beta must be in [0, 1), got {list(self.adam_betas)}",
        )
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "micro_batch_size",
            f"micro_batch_size={self.micro_batch_size} does not divide "
            f"global_batch_size={self.global_batch_size}",
            ("global_batch_size",),
        )


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed ZeRO's buffer and scheduling knobs, in parameter elements (not bytes). ``null``:
    derived from the model's width h, the largest of model.vit.width, model.text.width and
    model.ul2.d_model (``engine/deepspeed_config.py``), by the rules of DeepSpeed's autotuner
    (and HF's "auto") where it has one: DeepSpeed's fixed defaults (5e8-element buckets, 1e9 live
    parameters) suit models far wider than most and, on a smaller one, hold memory for nothing.
    The stage3_* knobs matter under ZeRO-3 only."""

    # Gradient elements reduced per collective; with contiguous_gradients, also the size of the
    # buffer they are copied into (DeepSpeed's 5e8 is a 2 GB fp32 buffer). null: h*h, at least
    # 2**22 (a collective's fixed cost, ``engine/deepspeed_config.py``).
    reduce_bucket_size: int | None = None
    # ZeRO-1/2: updated parameter elements all-gathered per collective after a step (used only
    # where torch lacks all_gather_into_tensor). Even. null: as reduce_bucket_size, made even.
    allgather_bucket_size: int | None = None
    # Parameter elements gathered ahead of their use. null: int(0.9*h*h).
    stage3_prefetch_bucket_size: int | None = None
    # Parameters smaller than this stay whole on every rank (norms, biases): no gather for them,
    # at the cost of their memory. null: 10*h (DeepSpeed's own default is 1e5).
    stage3_param_persistence_threshold: int | None = None
    # Most gathered elements a rank keeps at once; it caps prefetching. null: 12*h*h, one
    # transformer layer of width h (4h*h in attention, 8h*h in the feed-forward).
    stage3_max_live_parameters: int | None = None
    # A gathered parameter used again within this many elements stays gathered. DeepSpeed's 1e9
    # keeps a model under 1B gathered from its forward use to its backward use, i.e. whole on
    # every rank. null: 12*h*h, one layer (activation checkpointing's recompute reuses a gather).
    stage3_max_reuse_distance: int | None = None
    # ZeRO-3: the optimizer steps a rank's partition in tiles of this many elements; each tile's
    # fp32 gradient copy and the optimizer's temporaries are that large (DeepSpeed's 1e9 makes
    # one tile of any partition under 1B). A checkpoint resumes with the value it was saved with.
    # null: 12*h*h, one layer.
    sub_group_size: int | None = None
    # Overlap gradient reduction with the backward pass. null: DeepSpeed's (on for ZeRO-3 only).
    overlap_comm: bool | None = None
    # Copy gradients into the reduce bucket as they come (less fragmentation). null: true.
    contiguous_gradients: bool | None = None
    # ZeRO-3: the model's nn.Linear layers keep their weight, not a transposed view of it, for
    # the backward pass, so a gathered weight is freed after its forward use (DeepSpeed's
    # LinearFunctionForZeroStage3, applied to the model only: engine/zero3_linear.py).
    memory_efficient_linear: bool = True
    # ZeRO-3: build the model already partitioned over the data-parallel ranks
    # (deepspeed.zero.Init), so that no rank ever holds all of it; the weights equal those of the
    # unpartitioned build. false: every rank builds the whole model, DeepSpeed partitions it.
    partitioned_init: bool = True

    def __post_init__(self) -> None:
        for name in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
            "sub_group_size",
        ):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0 (or null), got {value}")
        threshold = self.stage3_param_persistence_threshold
        require(
            threshold is None or threshold >= 0,
            "stage3_param_persistence_threshold",
            f"must be >= 0 (or null), got {threshold}",
        )
        gather = self.allgather_bucket_size
        require(
            gather is None or gather % 2 == 0,
            "allgather_bucket_size",
            f"must be even (DeepSpeed aligns all-gather buffers to 4 bytes), got {gather}",
        )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    zero_stage: int = 0
    activation_checkpointing: bool = False
    # How long a collective may wait for its peers before the run fails (NCCL's watchdog, gloo's
    # timeout, megatron-core's groups). Work that only rank 0 does (a checkpoint's conversion to
    # the universal format, the final export) is waited for without a collective, so a slow
    # conversion cannot trip it; a rank that stops answering fails the job after this long.
    collective_timeout_s: float = 1800.0
    # DeepSpeed ZeRO's buckets, prefetching and partitioned construction (``ZeroConfig``).
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        _positive(self, "tensor_parallel_size", "collective_timeout_s")
        require(
            self.zero_stage in (0, 1, 2, 3),
            "zero_stage",
            f"must be one of 0, 1, 2, 3, got {self.zero_stage}",
        )


@dataclass(frozen=True)
class KernelsConfig:
    """Which implementation runs each hot spot of a training step, all chosen here and applied by
    ``pali3_train.kernels``. "auto" takes the fast path where the platform has one; the plain
    PyTorch path ("off", "separate", "sdpa", "plain") is the reference every fast path is tested
    against, and the fallback."""

    # Regional torch.compile of every transformer block; auto: on for CUDA.
    compile: Literal["auto", "on", "off"] = "auto"
    # q/k/v (and k/v, gate/up) as one GEMM over the fused weight, or one GEMM per projection.
    projections: Literal["fused", "separate"] = "fused"
    # UL2's relative-position bias: FlexAttention with a score_mod over the bucket table, or SDPA
    # with the bias broadcast over the batch; auto: flex on CUDA.
    attention: Literal["auto", "flex", "sdpa"] = "auto"
    # The LM head and its cross-entropy: liger-kernel's fused linear cross-entropy (Triton), the
    # same fused walk in PyTorch ops (``losses.fused_linear``), token chunks recomputed in the
    # backward, or the full logits at once. The fused ones need the whole head on one rank
    # (tensor parallel size 1, ZeRO < 3); auto: liger there on CUDA, fused there elsewhere,
    # chunked otherwise.
    cross_entropy: Literal["auto", "liger", "fused", "chunked", "plain"] = "auto"
    # Tokens per chunk (chunked, fused): the chunk's [tokens, vocab] fp32 logits against the
    # head gradient's [vocab, d_model], which the fused path holds once and the chunked one
    # thrice; 256 keeps a chunk below the head at d_model >= 256, and its GEMMs large.
    cross_entropy_chunk_tokens: int = 256
    # SigLIP's ring loss blocks: each block's logits, loss and gradients in one fused pass, or the
    # plain composition of PyTorch ops.
    ring_loss: Literal["fused", "plain"] = "fused"

    def __post_init__(self) -> None:
        _positive(self, "cross_entropy_chunk_tokens")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. ``tracking_uri: null`` (and no ``$MLFLOW_TRACKING_URI``) means the
    checkout's own store: ``<store_dir>/mlflow.db`` with artifacts in ``<store_dir>/mlartifacts``,
    shared by every run started from that directory, so one ``mlflow ui`` shows and compares
    them all. ``run_name: null`` names a run by its run directory and stage."""

    backend: Literal["mlflow", "none"] = "mlflow"
    tracking_uri: str | None = None
    store_dir: str = "runs"
    experiment: str = "pali3-train"
    run_name: str | None = None
    # CPU, memory, disk, network and (where present) GPU use, sampled by MLflow's own system
    # metrics monitor every this many seconds into the run's system/ metrics; null: off.
    system_metrics_every_s: float | None = 10.0
    # A curriculum's stages are nested under one parent run (set by launcher/curriculum.py).
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.store_dir.strip()), "store_dir", "must name a folder")
        every = self.system_metrics_every_s
        require(every is None or every > 0, "system_metrics_every_s", f"must be > 0, got {every}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # null: <run_dir>/checkpoints
    every_steps: int = 1000
    keep_last: int = 3
    # At the end of a stage, the consolidated fp32 weights go to <run_dir>/model.safetensors:
    # what the next stage's stage.init_from and `python -m pali3_train.generate` read.
    export_final: bool = True

    def __post_init__(self) -> None:
        _positive(self, "every_steps", "keep_last")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot classification on one eval source: the class of a held-out image is the name in
    ``classes`` that its caption contains; the model must pick it among the texts
    ``template.format(name)``."""

    source: str
    classes: tuple[str, ...]
    template: str = "{}"

    def __post_init__(self) -> None:
        require(len(self.classes) >= 2, "classes", "needs at least two class names")
        require("{}" in self.template, "template", "must contain {} for the class name")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during and after training, by the evaluators of the stage's
    objective (``pali3_train.eval``). Contrastive: image-text retrieval recall@1/5 per source and
    zero-shot classification. Generative: answers generated for each source's prompts, scored by
    its task (captions: CIDEr-D; VQA: VQA accuracy; OCR: exact match and ANLS). Sources are read
    once, in file order."""

    every_steps: int = 0  # 0: only at the end of the run
    sources: tuple[SourceConfig, ...] = ()
    zero_shot: tuple[ZeroShotConfig, ...] = ()
    max_samples: int = 512  # per source
    # Examples embedded (contrastive) or decoded (generative, per data-parallel rank) at once.
    batch_size: int = 32
    beam_size: int = 1  # 1: greedy decoding (generative)
    max_decode_tokens: int = 32  # generative

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "every_steps", f"must be >= 0, got {self.every_steps}")
        _positive(self, "max_samples", "batch_size", "beam_size", "max_decode_tokens")
        names = [s.name for s in self.sources]
        tasked = [task.source for task in self.zero_shot]
        for i, task in enumerate(self.zero_shot):
            require(
                task.source in names,
                f"zero_shot[{i}].source",
                f"{task.source!r} is not one of eval.sources {names}",
                ("sources",),
            )
            require(  # its metrics are named by the source: a second task would overwrite them
                tasked.index(task.source) == i,
                f"zero_shot[{i}].source",
                f"{task.source!r} has a zero-shot task already; give each source one",
            )


@dataclass(frozen=True)
class StageConfig:
    """What a curriculum stage is: its objective (which model trains on which loss, evaluated
    how, exported as what: one spec of ``pali3_train.stages``), which modules are frozen (by
    attribute path, e.g. ``vit``), which exported weights it starts from and what happens when
    their resolution differs."""

    # The curriculum stage this file trains: "0", "1", "2" or "transfer" (``pali3_train.stages.
    # CURRICULUM``). It tags the run, and ``launcher/run.py --stage`` must agree with it.
    # null: the objective alone says what trains.
    name: str | None = None
    # contrastive (SigLIP, stage 0) | generative (PaLI-3); null: the named stage's, else generative
    objective: str | None = None
    freeze: tuple[str, ...] = ()
    # A safetensors file exported by the previous stage (``python -m pali3_train.engine.export``);
    # keys it lacks keep their initialisation, e.g. the projection when stage 1 starts from SigLIP.
    init_from: str | None = None
    # A ViT whose patch grid differs from the init_from weights' (stage 2's resolution increase):
    # true resamples their position embeddings bilinearly to the new grid; false refuses to start.
    resample_position_embeddings: bool = True

    def __post_init__(self) -> None:
        require(
            self.name is None or self.name in CURRICULUM,
            "name",
            f"unknown stage {self.name!r}; the curriculum's stages are {', '.join(CURRICULUM)}",
        )
        if self.objective is None:  # frozen: set once, here, before anyone reads it
            named = CURRICULUM[self.name].objective if self.name else "generative"
            object.__setattr__(self, "objective", named)
        require(
            self.objective in OBJECTIVE_NAMES,
            "objective",
            f"unknown objective {self.objective!r}; known: {', '.join(OBJECTIVE_NAMES)}",
        )
        if self.name is None:
            return
        expected = CURRICULUM[self.name].objective
        require(
            expected == self.objective,
            "objective",
            f"stage {self.name} trains the {expected} objective, not {self.objective!r}",
            ("name",),
        )


# --------------------------------------------------------------------------------------- cluster


# Options cluster.submit writes itself: an sbatch_extra line may not set them (it would fight the
# job's own) and is pointed at the option that does.
SUBMIT_OWNS = {
    "job-name": "--job-name", "nodes": "--nodes", "ntasks-per-node": "--tasks-per-node",
    "cpus-per-task": "--cpus-per-task (cluster.cpus_per_task)", "time": "--time",
    "partition": "--partition", "account": "--account", "qos": "--qos",
    "gpus-per-node": "--gpus-per-node", "array": "several --config files",
    "signal": "--signal-seconds", "requeue": "--max-requeues", "output": "run_dir",
    "open-mode": "run_dir", "exclusive": "--exclusive (cluster.exclusive)",
    "constraint": "--constraint (cluster.constraint)", "mem": "--mem (cluster.mem)",
}  # fmt: skip
# Exported by the job script for the rendezvous, after cluster.env.
SCRIPT_OWNS_ENV = ("MASTER_ADDR", "MASTER_PORT")


def _one_line(value: str) -> bool:
    return bool(value.strip()) and "\n" not in value and "\r" not in value


def _no_space(value: str) -> bool:
    return bool(value) and not any(c.isspace() for c in value)


@dataclass(frozen=True)
class ClusterConfig:
    """How ``python -m pali3_train.cluster.submit`` builds a stage's Slurm job
    (``cluster/README.md``); the run itself reads none of it. Each field has a command-line
    option of the same name (``--setup``, ``--sbatch`` for sbatch_extra, ``--env``) that wins
    over it; ``--env`` items replace the config's by name, the other list options replace the
    config's list."""

    # Shell lines run in the job script, in order, before the ranks start (a failing line ends
    # the job): ``module load cuda/12.4``, ``source .venv/bin/activate``.
    setup: tuple[str, ...] = ()
    # The interpreter srun starts on every node, looked up on the job's PATH after the setup
    # lines (so a venv they activate is the one used); a path pins one.
    python: str = "python"
    # pyxis/enroot: srun runs the ranks in this image (--container-image), with these bind
    # mounts (--container-mounts=SRC:DST[,SRC:DST]); the working directory must be mounted.
    container_image: str | None = None
    container_mounts: str | None = None
    exclusive: bool = False  # whole nodes (--exclusive)
    constraint: str | None = None  # node features (--constraint=a100&ib)
    mem: str | None = None  # per node: "0" (all of it), "200G"; null: the cluster's default
    # null: data.num_workers + 1 (the rank and its loader workers)
    cpus_per_task: int | None = None
    # More #SBATCH lines, each an sbatch option: "--reservation=foo", "--mail-type=END".
    sbatch_extra: tuple[str, ...] = ()
    # NAME=VALUE exported in the job script after the setup lines, for every rank: NCCL_DEBUG=WARN.
    env: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, line in enumerate(self.setup):
            require(_one_line(line), f"setup[{i}]", f"must be one non-empty line, got {line!r}")
            require(
                not line.rstrip().endswith("\\"),
                f"setup[{i}]",
                f"must be a whole command, got a continued line {line!r}",
            )
        require(
            _one_line(self.python), "python", f"must be a command or a path, got {self.python!r}"
        )
        for name in ("container_image", "container_mounts", "constraint"):
            value = getattr(self, name)
            if value is not None:
                require(_no_space(value), name, f"must be non-empty, without spaces, got {value!r}")
        require(
            self.container_mounts is None or self.container_image is not None,
            "container_mounts",
            "needs container_image (mounts are for the container srun starts)",
            ("container_image",),
        )
        if self.mem is not None:
            number = self.mem[:-1] if self.mem[-1:].upper() in ("K", "M", "G", "T") else self.mem
            require(
                number.isdigit() and number.isascii(),
                "mem",
                f"must be a size like 0 (a node's whole memory), 64000 (MB) or 200G, "
                f"got {self.mem!r}",
            )
        if self.cpus_per_task is not None:
            require(
                self.cpus_per_task >= 1, "cpus_per_task", f"must be >= 1, got {self.cpus_per_task}"
            )
        for i, line in enumerate(self.sbatch_extra):
            where = f"sbatch_extra[{i}]"
            require(_one_line(line), where, f"must be one non-empty line, got {line!r}")
            require(
                line.startswith("--") and len(line) > 2,
                where,
                f"must be an sbatch option starting with --, got {line!r}",
            )
            option = line[2:].split("=", 1)[0].split()[0] if line[2:].strip() else ""
            require(
                option not in SUBMIT_OWNS,
                where,
                f"--{option} is set by cluster.submit itself: use {SUBMIT_OWNS.get(option)}",
            )
        names: list[str] = []
        for i, item in enumerate(self.env):
            name, sep, _ = item.partition("=")
            require(bool(sep), f"env[{i}]", f"must be NAME=VALUE, got {item!r}")
            require(
                name.isidentifier() and name.isascii(),
                f"env[{i}]",
                f"{name!r} is not a shell variable name (letters, digits and _, not first a digit)",
            )
            require(
                name not in SCRIPT_OWNS_ENV,
                f"env[{i}]",
                f"{name} is set by the job script for the rendezvous",
            )
            require(name not in names, f"env[{i}]", f"{name} is given twice")
            names.append(name)


@dataclass(frozen=True)
class Config:
    # Everything a run writes goes below this folder: checkpoints, the local MLflow store,
    # metrics.jsonl, the resolved config and the loss curve.
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # How cluster.submit builds the Slurm job (the run itself ignores it).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"

    def __post_init__(self) -> None:
        tp = self.parallel.tensor_parallel_size
        require(
            not (self.kernels.cross_entropy == "liger" and tp > 1),
            "kernels.cross_entropy",
            "liger needs the whole vocabulary on one rank; with "
            f"parallel.tensor_parallel_size={tp} use chunked (or auto)",
            ("parallel.tensor_parallel_size",),
        )
        for path, value in (
            ("model.ul2.num_heads", self.model.ul2.num_heads),
            ("model.vit.num_heads", self.model.vit.num_heads),
            ("model.ul2.vocab_size", self.model.ul2.vocab_size),
        ):
            require(
                value % tp == 0,
                path,
                f"{value} is not divisible by parallel.tensor_parallel_size={tp}",
                ("parallel.tensor_parallel_size",),
            )
