"""The SigLIP text tower against HuggingFace's SiglipTextModel."""

import pytest
import torch

from pali3_train.convert.siglip import siglip_from_hf
from pali3_train.models import SigLIP
from tests.hf_reference import TEXT, VIT, hf_siglip, model_config, ul2_config


def test_pooled_embedding_matches_huggingface():
    hf = hf_siglip()
    ours = SigLIP(model_config(ul2_config("gated-gelu"))).eval()
    ours.load_state_dict(siglip_from_hf(hf.state_dict(), VIT, TEXT))
    tokens = torch.randint(0, TEXT.vocab_size, (4, TEXT.max_len))
    with torch.no_grad():
        reference = hf.text_model(input_ids=tokens).pooler_output
        pooled = ours.text(tokens)
    assert pooled.shape == (4, VIT.width)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-5)


def test_too_long_text_names_the_config_field():
    model = SigLIP(model_config(ul2_config("gated-gelu")))
    with pytest.raises(ValueError, match="model.text.max_len"):
        model.text(torch.zeros(1, TEXT.max_len + 1, dtype=torch.long))
