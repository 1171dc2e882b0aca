"""What a device can compute at most, the denominator of MFU and HFU, and the switch that puts
fp32 matmuls on the TF32 tensor cores that fp32 runs are then measured against.

Dense peaks (no 2:4 sparsity: the datasheets' headline tensor figures assume it and are twice
these) from NVIDIA's datasheets and the Hopper whitepaper, TFLOP/s, by the exact name
``torch.cuda.get_device_name()`` gives: an H100 SXM, PCIe and NVL differ by up to 30%, so a
substring would pick the wrong one. A device not listed gets no peak, and the trainer then logs
no MFU rather than a wrong one. ``fp32`` is the CUDA cores' figure: an fp32 run whose matmuls
stay in IEEE fp32 (``enable_tf32`` not called).
"""

from __future__ import annotations

import torch

HOPPER_SXM = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
HOPPER_NVL = {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}
AMPERE_A100 = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}  # SXM4 and PCIe alike

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": HOPPER_SXM,  # the SXM5 part
    "NVIDIA H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "NVIDIA H100 NVL": HOPPER_NVL,
    "NVIDIA H200": HOPPER_SXM,  # the SXM part: H100's compute, more and faster memory
    "NVIDIA H200 NVL": HOPPER_NVL,
    "NVIDIA A100-SXM4-40GB": AMPERE_A100,
    "NVIDIA A100-SXM4-80GB": AMPERE_A100,
    "NVIDIA A100-PCIE-40GB": AMPERE_A100,
    "NVIDIA A100 80GB PCIe": AMPERE_A100,
    "NVIDIA L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
}


def peak_flops(device_name: str, matmul: str) -> float | None:
    """Dense FLOP/s of the device called ``device_name`` multiplying in ``matmul`` (bf16, tf32
    or fp32); None for a device not in the table."""
    figures = PEAK_TFLOPS.get(device_name)
    return figures[matmul] * 1e12 if figures else None


def matmul_precision(precision: str) -> str:
    """What ``train.precision``'s matmuls multiply in: fp32 ones in TF32 once it is enabled."""
    if precision == "fp32" and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "tf32"
    return precision


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The peak a run in ``train.precision`` on ``device`` is measured against; None off CUDA."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), matmul_precision(precision))


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (a 10-bit mantissa, fp32's range):
    ~7x an H100's fp32 CUDA cores for a rounding well inside what training tolerates; bf16 runs
    are untouched. CUDA only: CPU matmuls stay IEEE. Set through torch's older switches, which
    ``torch._inductor`` still reads: once the newer ``fp32_precision`` ones are set, reading the
    older ones raises (``matmul_precision`` reads the newer, which reflect either)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
