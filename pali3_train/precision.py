"""What ``train.precision`` means, written down once; the code that applies it calls these.

``fp32``: weights, activations, gradients and optimizer state in fp32 (on CUDA, matmuls may use
TF32 tensor cores, as the trainer enables at start-up).

``bf16``:
- weights and activations in bf16: DeepSpeed casts the module (under ZeRO-3 our partitioned
  construction casts each module as it partitions it, ``engine.zero_init``) and keeps an fp32 master
  copy of every trained weight, with fp32 Adam moments (``deepspeed_section``); model inputs
  (images) come in ``compute_dtype``. Gradients are reduced and accumulated in bf16 and applied to
  the fp32 master weights. (DeepSpeed's fp32 accumulation, ``data_types.grad_accum_dtype``, exists
  only for ZeRO-1 through a separate bf16 optimizer whose checkpoints its own consolidation,
  ``zero_to_fp32``, cannot read: the final export would fail.)
- in fp32: normalisation (LayerNorm and RMSNorm statistics and their affine, ``models.fused``:
  their weights are stored in bf16 like every weight and read in fp32); the token cross-entropy
  (logits upcast before the log-softmax, ``losses.text`` and the vocabulary-parallel loss); the
  whole SigLIP sigmoid loss (embeddings upcast; logits, sums and the gradient accumulators
  that travel round the ring in fp32, ``losses.siglip_ring``). Its temperature and bias are
  stored as bf16 offsets from their initial values and added to them in fp32
  (``models.siglip``): stored whole, bf16 would round away every update they get.
- attention's softmax statistics (running max and sum) are kept in fp32 by SDPA's fused kernels
  (flash, memory-efficient and cuDNN on GPU, the flash kernel on CPU); the additive attention
  bias enters in the activations' dtype, as SDPA requires.

fp64 tensors (reference computations in tests) stay fp64 everywhere: "fp32" below means "at
least fp32".
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of weights, activations and model inputs under ``train.precision``."""
    return COMPUTE_DTYPES[precision]


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype a numerically sensitive computation on ``dtype`` data runs in."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``at_least_fp32`` (no copy when it already is)."""
    return x.to(at_least_fp32(x.dtype))


def deepspeed_section(precision: str) -> dict:
    """DeepSpeed's precision entry: bf16 means bf16 weights with fp32 master copies and fp32
    optimizer state, under every ZeRO stage."""
    return {"bf16": {"enabled": precision == "bf16"}}
