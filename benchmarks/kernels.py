"""Each fast kernel against the plain PyTorch path it replaces, and the model against HuggingFace.

    .venv/bin/python -m benchmarks.kernels [--device cpu|cuda] [--sections ...] [--reps 5]
        [--out benchmarks/results/kernels.md]

Why: every switch in ``kernels:`` (``pali3_train.kernels``) exists to make the step faster or
leaner; this shows by how much, on the machine it runs on, with the plain path measured in the
same run as the baseline (ratio = variant / baseline: below 1.0x is better).

Sections (one table each):
- ``model``: forward + backward of the ``small`` preset's towers (UL2 with its loss; the ViT at
  224 px) against HuggingFace's ``T5ForConditionalGeneration`` and ``SiglipVisionModel`` built
  from the same config, same weights, same batch. Ours three ways: plain kernels, the resolved
  default kernels with compile off, and compiled.
- ``cross_entropy``: the LM head and its loss at 2,048 tokens x vocab 32,128 and 250,112: chunked
  (and liger on CUDA) against the full logits.
- ``attention``: UL2's encoder self-attention with the relative-position bias at 812 px's token
  count: FlexAttention against SDPA with the dense bias (forward only on CPU, where FlexAttention
  has no backward).
- ``ring_block``: one b x b block of SigLIP's ring loss, fused against plain.
- ``projections``: a UL2 encoder layer with fused against separate projection GEMMs.
- ``adamw``: one AdamW step over the ``small`` preset's UL2 parameters, fused against torch's
  per-parameter loop.

Times are medians over ``--reps`` after one warm-up (CUDA: synchronised around each call);
memory is the peak of what one call allocates (``benchmarks.allocations``); max err is the
largest absolute difference of the outputs and gradients from the baseline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.allocations import peak_bytes
from pali3_train.config import ParallelConfig, load_config
from pali3_train.config.schema import KernelsConfig
from pali3_train.kernels import PLAIN, Kernels, apply_kernels, resolve_kernels

MiB = 2**20


@dataclass
class Row:
    case: str
    variant: str
    ms: float
    peak_mib: float
    max_err: float
    ratio_ms: float = 1.0
    ratio_mem: float = 1.0


@dataclass
class Variant:
    """One way of computing a case: ``run()`` does forward + backward and returns the tensors
    (outputs, gradients) compared against the baseline's."""

    name: str
    run: Callable[[], list[torch.Tensor]]
    prepare: Callable[[], None] = lambda: None  # before every call, untimed


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(variant: Variant, device: torch.device, reps: int) -> float:
    variant.prepare()
    variant.run()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        variant.prepare()
        _sync(device)
        start = time.perf_counter()
        variant.run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def max_error(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(((a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference)),
               default=0.0)  # fmt: skip


def compare(case: str, variants: list[Variant], device: torch.device, reps: int) -> list[Row]:
    """Rows for ``variants``, the first being the baseline."""
    variants[0].prepare()
    reference = [t.detach().clone() for t in variants[0].run()]
    rows = []
    for variant in variants:
        ms = median_ms(variant, device, reps)
        variant.prepare()
        peak = peak_bytes(variant.run, device) / MiB
        variant.prepare()
        error = max_error(variant.run(), reference)
        rows.append(Row(case, variant.name, ms, peak, error))
        print(f"  {case:<34} {variant.name:<22} {ms:9.2f} ms {peak:9.1f} MiB  err {error:.1e}",
              flush=True)  # fmt: skip
    for row in rows:
        row.ratio_ms = row.ms / rows[0].ms
        row.ratio_mem = row.peak_mib / rows[0].peak_mib if rows[0].peak_mib else 1.0
    return rows


def fwd_bwd(
    loss: Callable[[], torch.Tensor], params: Iterable[torch.Tensor]
) -> Callable[[], list[torch.Tensor]]:
    """A Variant.run: the loss and the gradients of ``params`` (grads reset before each call)."""
    params = [p for p in params if p.requires_grad]

    def run() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        value = loss()
        value.backward()
        return [value.detach()] + [p.grad for p in params]

    return run


# ------------------------------------------------------------------------------- sections


def small_preset():
    return load_config("configs/models/small.yaml").model


def kernels_for(device: torch.device, compile: bool) -> Kernels:
    resolved = resolve_kernels(KernelsConfig(), device, ParallelConfig())
    return dataclasses.replace(resolved, compile=compile)


def section_model(device: torch.device, reps: int) -> list[Row]:
    """PaLI-3 of the small preset (ViT-S/16 at 224 px, UL2 shaped like T5 v1.1 Small), ours
    against the same computation assembled from HuggingFace's towers: SiglipVisionModel's
    tokens (no pooling head), the same linear projection, prepended to T5's embedded prompt.
    The error is the loss's (``loss_only``)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from pali3_train.convert.pali3 import pali3_from_towers
    from pali3_train.convert.rename import add_prefix
    from pali3_train.convert.siglip import hf_config as siglip_hf_config
    from pali3_train.convert.siglip import siglip_from_hf
    from pali3_train.convert.t5 import ul2_from_hf
    from pali3_train.models.pali3 import PaLI3
    from tests.hf_reference import hf_t5

    cfg = small_preset()
    torch.manual_seed(0)
    vision_cfg = siglip_hf_config(cfg.vit, cfg.text)["vision_config"] | {"vision_use_head": False}
    hf_vit = SiglipVisionModel(SiglipVisionConfig(**vision_cfg)).to(device).train()
    hf_ul2 = hf_t5(cfg.ul2).to(device).train()
    projection = nn.Linear(cfg.vit.width, cfg.ul2.d_model).to(device)
    weights = pali3_from_towers(
        siglip_from_hf(add_prefix(hf_vit.state_dict(), "vision_model."), cfg.vit),
        ul2_from_hf(hf_ul2.state_dict()),
    )
    weights |= {f"projection.{k}": v for k, v in projection.state_dict().items()}

    batch, prompt_len, answer_len = 4, 32, 32
    size = cfg.vit.image_size_px
    images = torch.randn(batch, 3, size, size, device=device)
    prompt = torch.randint(2, cfg.ul2.vocab_size, (batch, prompt_len), device=device)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    target = torch.randint(2, cfg.ul2.vocab_size, (batch, answer_len), device=device)
    target_mask = torch.ones_like(target, dtype=torch.bool)

    def hf_loss() -> torch.Tensor:
        visual = projection(hf_vit(pixel_values=images).last_hidden_state)
        embeds = torch.cat([visual, hf_ul2.shared(prompt)], dim=1)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=torch.long, device=device),
                          prompt_mask.long()], dim=1)  # fmt: skip
        return hf_ul2(inputs_embeds=embeds, attention_mask=mask, labels=target).loss

    def ours(kernels: Kernels) -> Variant:
        model = PaLI3(cfg).to(device).train()
        model.load_state_dict(weights)
        apply_kernels(model, kernels)
        loss = lambda: model(images, prompt, prompt_mask, target, target_mask).loss  # noqa: E731
        return fwd_bwd(loss, model.parameters())

    hf_params = [*hf_vit.parameters(), *projection.parameters(), *hf_ul2.parameters()]
    runs = {
        "HuggingFace": fwd_bwd(hf_loss, hf_params),
        "ours, plain": ours(PLAIN),
        "ours, kernels": ours(kernels_for(device, compile=False)),
        "ours, kernels + compile": ours(kernels_for(device, compile=True)),
    }
    variants = [Variant(name, loss_only(run)) for name, run in runs.items()]
    visual = (size // cfg.vit.patch_size_px) ** 2
    case = f"PaLI-3 small, {batch} x ({visual} + {prompt_len} -> {answer_len} tokens)"
    return compare(case, variants, device, reps)


def loss_only(run: Callable[[], list[torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
    """``run`` (forward and backward) compared by its loss alone: the layouts differ (ours fuses
    q/k/v and gate/up), and at HuggingFace's random T5 initialisation the network is so
    sensitive (gradient norm ~2.6e7) that a GEMM of another shape, rounding otherwise, moves the
    gradients visibly. Parity with HuggingFace is the tests' job (``tests/models``)."""
    return lambda: run()[:1]


def section_adamw(device: torch.device, reps: int) -> list[Row]:
    """One optimizer step over the small preset's UL2 parameter shapes (random gradients)."""
    from pali3_train.models import UL2

    shapes = [p.shape for p in UL2(small_preset().ul2).parameters()]

    def step(**kernel) -> Variant:
        torch.manual_seed(0)
        params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kernel)
        optimizer.step()  # the moments exist from here on, as in training
        start = [t.clone() for t in _adamw_tensors(optimizer)]

        def prepare() -> None:  # every call steps from the same weights and moments
            with torch.no_grad():
                for t, value in zip(_adamw_tensors(optimizer), start):
                    t.copy_(value)

        def run() -> list[torch.Tensor]:
            optimizer.step()
            return params[:4]

        return Variant(", ".join(f"{k}={v}" for k, v in kernel.items()), run, prepare)

    variants = [step(foreach=False), step(foreach=True), step(fused=True)]
    return compare(f"AdamW step, {len(shapes)} tensors", variants, device, reps)


def section_attention(device: torch.device, reps: int) -> list[Row]:
    """One UL2 encoder layer of the small preset over 812 px's token count (3,364 visual + 64
    prompt tokens, some prompt padding), through ``UL2.encode``: the relative-position bias and
    padding as FlexAttention's score_mod and block mask against SDPA's dense bias. Forward and
    backward on CUDA; forward only elsewhere (FlexAttention has no CPU backward, and runs eager
    there, materialising the scores)."""
    from pali3_train.models import UL2

    cfg = dataclasses.replace(small_preset().ul2, num_encoder_layers=1)
    torch.manual_seed(0)
    batch, length = 2, 58 * 58 + 64
    x = torch.randn(batch, length, cfg.d_model, device=device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[1, -40:] = False
    training = device.type == "cuda"

    def encoder(attention: str) -> Variant:
        torch.manual_seed(0)
        model = UL2(cfg).to(device)
        model.attention = attention
        if training:
            return Variant(attention, fwd_bwd(lambda: model.encode(x, mask).square().mean(),
                                              model.parameters()))  # fmt: skip

        def forward() -> list[torch.Tensor]:
            with torch.no_grad():
                return [model.encode(x, mask)[mask]]

        return Variant(f"{attention} (forward only)", forward)

    return compare(f"UL2 encoder layer, {batch} x {length} tokens", [encoder("sdpa"),
                   encoder("flex")], device, reps)  # fmt: skip


def section_projections(device: torch.device, reps: int) -> list[Row]:
    """One UL2 encoder layer and one ViT block of the small preset: q/k/v and gate/up as one
    GEMM each against one GEMM per projection (over the same weights)."""
    from pali3_train.models.transformer import EncoderBlock
    from pali3_train.models.ul2 import EncoderLayer

    preset = small_preset()
    batch = 8
    cases = {
        f"UL2 encoder layer, {batch} x 256 tokens": (
            lambda: EncoderLayer(preset.ul2),
            torch.randn(batch, 256, preset.ul2.d_model, device=device),
            {"bias": None},
        ),
        f"ViT block, {batch} x 196 tokens": (
            lambda: EncoderBlock(preset.vit.width, preset.vit.num_heads, preset.vit.mlp_dim, 1e-6),
            torch.randn(batch, 196, preset.vit.width, device=device),
            {},
        ),
    }
    rows = []
    for case, (build, x, kwargs) in cases.items():
        variants = []
        for projections in ("separate", "fused"):
            torch.manual_seed(0)
            layer = build().to(device)
            apply_kernels(layer, dataclasses.replace(PLAIN, projections=projections))
            loss = lambda layer=layer, x=x, kw=kwargs: layer(x, **kw).square().mean()  # noqa: E731
            variants.append(Variant(projections, fwd_bwd(loss, layer.parameters())))
        rows += compare(case, variants, device, reps)
    return rows


def section_ring_block(device: torch.device, reps: int) -> list[Row]:
    """SigLIP's loss over one b x b block (one process: the ring's local block), fused against
    plain; ``benchmarks/siglip_loss.py`` times the whole ring across ranks."""
    import math

    import torch.nn.functional as F

    rows = []
    for b in (1024, 4096):
        torch.manual_seed(0)
        images = F.normalize(torch.randn(b, 768, device=device), dim=-1).requires_grad_()
        texts = F.normalize(images.detach() + torch.randn_like(images), dim=-1).requires_grad_()
        scale = torch.full((1,), math.log(10.0), device=device, requires_grad=True)
        bias = torch.full((1,), -10.0, device=device, requires_grad=True)
        inputs = [images, texts, scale, bias]
        variants = [Variant(k, fwd_bwd(_ring_loss(inputs, k), inputs)) for k in ("plain", "fused")]
        rows += compare(f"sigmoid loss block, b = {b}, dim 768", variants, device, reps)
    return rows


def _ring_loss(inputs: list[torch.Tensor], kernel: str) -> Callable[[], torch.Tensor]:
    from pali3_train.losses.siglip_ring import ring_sigmoid_loss

    return lambda: ring_sigmoid_loss(*inputs, kernel=kernel)


def _adamw_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = optimizer.param_groups[0]["params"]
    state = optimizer.state
    return [*params, *(state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "step"))]


SECTIONS: dict[str, Callable[[torch.device, int], list[Row]]] = {
    "model": section_model,
    "attention": section_attention,
    "ring_block": section_ring_block,
    "projections": section_projections,
    "adamw": section_adamw,
}


# --------------------------------------------------------------------------------- output


def table(title: str, rows: list[Row]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| case | variant | ms | x baseline | peak MiB | x baseline | max err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.variant} | {r.ms:.2f} | {r.ratio_ms:.2f}x | {r.peak_mib:.1f} | "
            f"{r.ratio_mem:.2f}x | {r.max_err:.1e} |"
        )
    return lines + [""]


def header(device: torch.device) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = torch.get_num_threads()
    return [
        f"Device: {device.type} ({name or platform.machine()}), {threads} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.md"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    lines = header(device)
    for name in args.sections:
        print(f"[{name}]", flush=True)
        lines += table(name, SECTIONS[name](device, args.reps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
