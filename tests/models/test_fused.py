"""The fused-kernel dispatch: PyTorch's path is taken without apex (or on CPU) and equals a
from-scratch formula; apex's path, where apex and a GPU exist, equals PyTorch's."""

import pytest
import torch

from pali3_train.models import fused


def _inputs(device="cpu"):
    x = torch.randn(4, 7, 32, device=device)
    return x, torch.randn(32, device=device), torch.randn(32, device=device)


def test_cpu_tensors_take_the_pytorch_path():
    x, _, _ = _inputs()
    assert fused.norm_backend(x) == "torch"


def test_without_apex_nothing_is_loaded():
    try:
        import apex.normalization  # noqa: F401
    except ImportError:
        assert fused._APEX is None
    else:
        assert fused._APEX is not None


def test_layer_norm_equals_the_formula():
    x, w, b = _inputs()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * w + b
    torch.testing.assert_close(fused.layer_norm(x, w, b, 1e-6), expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_equals_t5s_formula():
    x, w, _ = _inputs()
    expected = w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gated-gelu", "gated-silu"])
def test_gated_activation_equals_the_formula(kind):
    gate, up = torch.randn(5, 9), torch.randn(5, 9)
    if kind == "gated-gelu":
        act = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)))
    else:
        act = gate * torch.sigmoid(gate)
    torch.testing.assert_close(fused.gated_activation(gate, up, kind), act * up)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="relu"):
        fused.gated_activation(torch.ones(1), torch.ones(1), "relu")


@pytest.mark.skipif(
    fused._APEX is None or not torch.cuda.is_available(),
    reason="NVIDIA apex and a CUDA device are needed for the fused path",
)
def test_apex_and_pytorch_paths_agree_on_gpu():
    x, w, b = _inputs("cuda")
    assert fused.norm_backend(x) == "apex"
    torch.testing.assert_close(
        fused.layer_norm(x, w, b, 1e-6), torch.nn.functional.layer_norm(x, (32,), w, b, 1e-6)
    )
    torch.testing.assert_close(
        fused.rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (32,), w, 1e-6)
    )
