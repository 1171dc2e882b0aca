"""FlexAttention's UL2 biases against the dense SDPA path.

On CPU, FlexAttention runs forward only: the forwards are compared directly, and the gradient into
the bucket table is checked through a dense evaluation of the same index function (the score_mod
applied to every (head, query, key) at once), which is what the kernel computes per score. The
kernel's own backward is compared where a GPU can run it.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pali3_train.config import ParallelConfig, TextConfig, ViTConfig
from pali3_train.config.schema import FieldError, KernelsConfig
from pali3_train.kernels import Kernels, apply_kernels, resolve_kernels
from pali3_train.models import UL2
from pali3_train.models.flex_bias import relative_score_mod
from pali3_train.models.text import TextTransformer
from pali3_train.models.ul2 import RelativePositionBias, shift_right
from pali3_train.models.vit import VisionTransformer
from tests.hf_reference import ul2_config
from tests.models.test_ul2 import _batch

CUDA = torch.cuda.is_available()


def _dense_score_mod(rpb: RelativePositionBias, q_len: int, k_len: int) -> torch.Tensor:
    """The score_mod evaluated at every (head, query, key) of a zero score -> [1, H, Lq, Lk]."""
    heads = rpb.embed.embedding_dim
    score_mod = relative_score_mod(rpb.per_offset(q_len, k_len), q_len)
    h = torch.arange(heads)[:, None, None]
    q_idx = torch.arange(q_len)[None, :, None]
    kv_idx = torch.arange(k_len)[None, None, :]
    return score_mod(torch.zeros(()), torch.zeros((), dtype=torch.long), h, q_idx, kv_idx)[None]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(13, 13), (5, 29), (29, 7)])
def test_score_mod_equals_dense_bias_and_its_gradient(bidirectional, q_len, k_len):
    torch.manual_seed(0)
    rpb = RelativePositionBias(ul2_config("gated-silu"), bidirectional)
    upstream = torch.randn(1, rpb.embed.embedding_dim, q_len, k_len)

    dense = rpb(q_len, k_len)
    (grad_dense,) = torch.autograd.grad((dense * upstream).sum(), rpb.embed.weight)
    flex = _dense_score_mod(rpb, q_len, k_len)
    (grad_flex,) = torch.autograd.grad((flex * upstream).sum(), rpb.embed.weight)

    torch.testing.assert_close(flex, dense, atol=0, rtol=0)
    torch.testing.assert_close(grad_flex, grad_dense, atol=1e-6, rtol=1e-6)


def _ul2_pair():
    torch.manual_seed(0)
    cfg = ul2_config("gated-silu")
    sdpa = UL2(cfg).eval()
    flex = UL2(cfg).eval()
    flex.load_state_dict(sdpa.state_dict())
    flex.attention = "flex"
    return cfg, sdpa, flex


def test_flex_forward_matches_sdpa_with_padding_and_causality():
    cfg, sdpa, flex = _ul2_pair()
    # odd lengths, no multiple of FlexAttention's 128-token blocks, padding in every row but one
    inputs, input_mask, targets, _ = _batch(cfg, lengths=(37, 21, 30), target_lengths=(11, 4, 9))
    decoder_in = shift_right(targets, cfg.pad_id)
    with torch.no_grad():
        encoded = [m.encode(m.embed(inputs), input_mask) for m in (sdpa, flex)]
        logits = [m(inputs, input_mask, decoder_in) for m in (sdpa, flex)]
    real = input_mask[..., None].expand_as(encoded[0])
    torch.testing.assert_close(encoded[1][real], encoded[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_generation_with_a_cache_takes_the_dense_path():
    cfg, sdpa, flex = _ul2_pair()
    inputs, input_mask, targets, _ = _batch(cfg)
    with torch.no_grad():
        memory = sdpa.encode(sdpa.embed(inputs), input_mask)
        states = [m.start_decoding(memory, input_mask, use_cache=True) for m in (sdpa, flex)]
        steps = [m.decode(targets[:, :1], s) for m, s in zip((sdpa, flex), states)]
    torch.testing.assert_close(steps[1], steps[0], atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no backward on CPU")
def test_flex_gradients_into_the_bucket_tables_match_sdpa_on_cuda():
    cfg, sdpa, flex = _ul2_pair()
    inputs, input_mask, targets, _ = _batch(cfg, lengths=(37, 21, 30), target_lengths=(11, 4, 9))
    grads = []
    for model in (sdpa.cuda().train(), flex.cuda().train()):
        logits = model(inputs.cuda(), input_mask.cuda(), shift_right(targets, cfg.pad_id).cuda())
        logits.square().mean().backward()
        grads.append([model.encoder_bias.embed.weight.grad, model.decoder_bias.embed.weight.grad])
    for flex_grad, dense_grad in zip(grads[1], grads[0]):
        # FlexAttention sums the table's gradient with atomics: order-dependent rounding
        torch.testing.assert_close(flex_grad, dense_grad, atol=1e-4, rtol=1e-4)


def test_towers_without_masks_run_on_the_flash_kernel():
    """The ViT and SigLIP text tower pass no mask, so SDPA may take its flash kernel (CUDA in
    bf16, and CPU's flash kernel here): restricted to flash alone, they still run."""
    vit = VisionTransformer(ViTConfig(image_size_px=32, patch_size_px=8, width=32, depth=1,
                                      num_heads=2, mlp_dim=64))  # fmt: skip
    text = TextTransformer(TextConfig(vocab_size=50, width=32, depth=1, num_heads=2, mlp_dim=64,
                                      max_len=8), embed_dim=16)  # fmt: skip
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        vit(torch.randn(2, 3, 32, 32)).sum().backward()
        text(torch.randint(0, 50, (2, 8))).sum().backward()


def test_the_resolved_choice_reaches_the_model_and_cpu_training_refuses_flex():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernels(KernelsConfig(), cpu, ParallelConfig()).attention == "sdpa"
    assert resolve_kernels(KernelsConfig(), cuda, ParallelConfig()).attention == "flex"
    with pytest.raises(FieldError, match="no backward on cpu") as refused:
        resolve_kernels(KernelsConfig(attention="flex"), cpu, ParallelConfig())
    assert refused.value.field_path == "kernels.attention"
    model = UL2(ul2_config("gated-silu"))
    apply_kernels(model, Kernels(False, "fused", "flex", "plain", 1024, "plain"))
    assert model.attention == "flex"
