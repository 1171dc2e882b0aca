"""The two-tower model and the dense sigmoid loss against HuggingFace's SiglipModel."""

import math

import torch

from pali3_train.convert.siglip import siglip_from_hf
from pali3_train.losses.siglip import sigmoid_loss
from pali3_train.models import SigLIP
from tests.hf_reference import TEXT, VIT, hf_siglip, model_config, ul2_config


def test_logits_and_loss_match_huggingface():
    hf = hf_siglip()
    ours = SigLIP(model_config(ul2_config("gated-gelu"))).eval()
    ours.load_state_dict(siglip_from_hf(hf.state_dict(), VIT, TEXT))
    images = torch.randn(5, 3, VIT.image_size_px, VIT.image_size_px)
    tokens = torch.randint(0, TEXT.vocab_size, (5, TEXT.max_len))
    with torch.no_grad():
        reference = hf(input_ids=tokens, pixel_values=images, return_loss=True)
        image_emb, text_emb = ours(images, tokens)
        logits = image_emb @ text_emb.T * ours.logit_scale().exp() + ours.logit_bias()
        loss = sigmoid_loss(image_emb, text_emb, ours.logit_scale(), ours.logit_bias())
    torch.testing.assert_close(logits, reference.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_initial_temperature_and_bias_follow_the_paper():
    model = SigLIP(model_config(ul2_config("gated-gelu")))
    assert math.isclose(model.logit_scale().exp().item(), 10.0, rel_tol=1e-6)
    assert model.logit_bias().item() == -10.0


def test_sigmoid_loss_equals_a_pairwise_loop():
    n = 6
    img = torch.nn.functional.normalize(torch.randn(n, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, 8, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(1.7, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = (1 if i == j else -1) * (math.exp(1.7) * float(img[i] @ txt[j]) - 3.0)
            total += math.log1p(math.exp(-z))
    assert math.isclose(sigmoid_loss(img, txt, scale, bias).item(), total / n, rel_tol=1e-12)
