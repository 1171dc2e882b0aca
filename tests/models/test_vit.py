"""The SigLIP vision tower against HuggingFace's SiglipVisionModel, and position-embedding
resampling against closed-form expectations."""

import pytest
import torch

from pali3_train.convert.siglip import siglip_from_hf
from pali3_train.models import MAPHead, SigLIP, VisionTransformer, resample_posemb
from tests.hf_reference import TEXT, VIT, hf_siglip, model_config, ul2_config


@pytest.fixture(scope="module")
def towers():
    hf = hf_siglip()
    ours = SigLIP(model_config(ul2_config("gated-gelu"))).eval()
    ours.load_state_dict(siglip_from_hf(hf.state_dict(), VIT, TEXT))
    return hf, ours


def test_tokens_and_pooled_output_match_huggingface(towers):
    hf, ours = towers
    images = torch.randn(3, 3, VIT.image_size_px, VIT.image_size_px)
    with torch.no_grad():
        reference = hf.vision_model(pixel_values=images)
        tokens = ours.image(images)
        pooled = ours.image_head(tokens)
    assert tokens.shape == (3, VIT.num_patches, VIT.width)
    torch.testing.assert_close(tokens, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference.pooler_output, atol=1e-5, rtol=1e-5)


def test_wrong_resolution_is_refused_with_the_config_field():
    vit = VisionTransformer(VIT)
    with pytest.raises(ValueError, match="model.vit.image_size_px"):
        vit(torch.randn(1, 3, VIT.image_size_px + VIT.patch_size_px, VIT.image_size_px))


def test_map_head_pools_each_image_independently():
    head = MAPHead(VIT).eval()
    tokens = torch.randn(4, VIT.num_patches, VIT.width)
    with torch.no_grad():
        batched = head(tokens)
        single = torch.cat([head(tokens[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)


def test_resampling_to_the_same_grid_is_the_identity():
    posemb = torch.randn(VIT.num_patches, VIT.width)
    assert torch.equal(resample_posemb(posemb, VIT.grid_size), posemb)


@pytest.mark.parametrize("old_grid,new_grid", [(4, 7), (16, 58), (6, 3)])
def test_resampling_a_linear_ramp_stays_linear(old_grid, new_grid):
    """Each embedding sits at its cell centre; a ramp a + b*row + c*col sampled there must come
    out as the same ramp evaluated at the new cell centres (clamped at the outer half cell,
    where bilinear interpolation has no neighbour to extrapolate from)."""
    a, b, c = 0.5, 2.0, -3.0
    rows, cols = torch.meshgrid(
        torch.arange(old_grid.__float__()), torch.arange(old_grid.__float__()), indexing="ij"
    )
    ramp = (a + b * rows + c * cols).reshape(-1, 1).repeat(1, 2)
    out = resample_posemb(ramp.double(), new_grid)

    centre = (torch.arange(new_grid, dtype=torch.float64) + 0.5) * old_grid / new_grid - 0.5
    centre = centre.clamp(0, old_grid - 1)
    new_rows, new_cols = torch.meshgrid(centre, centre, indexing="ij")
    expected = (a + b * new_rows + c * new_cols).reshape(-1)
    torch.testing.assert_close(out[:, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], expected, atol=1e-5, rtol=0)


def test_resampling_rejects_a_non_square_table():
    with pytest.raises(ValueError, match="square"):
        resample_posemb(torch.randn(10, 4), 3)
