"""Parameter counting: meta-device counts against closed-form formulas and a real model, and the
5B preset against the PaLI-3 paper's stated sizes."""

from pathlib import Path

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.models import PaLI3
from pali3_train.params import PAPER, count, main, parameter_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _vit_formula(v) -> int:
    """Patch conv + position table + blocks (attention 4 w^2 + 4 w, MLP 2 w m + m + w, two
    LayerNorms 4 w) + final LayerNorm."""
    w, m = v.width, v.mlp_dim
    block = 4 * w * w + 4 * w + 2 * w * m + m + w + 4 * w
    return 3 * v.patch_size_px**2 * w + w + v.num_patches * w + v.depth * block + 2 * w


def _ul2_formula(u) -> int:
    """Embedding + LM head, attention 4 d (h dkv), gated FF 3 d f, one RMSNorm per sublayer,
    two bucket tables and two final norms; no biases anywhere."""
    d, inner, f = u.d_model, u.num_heads * u.d_kv, u.d_ff
    attn, ff = 4 * d * inner, 3 * d * f
    enc = u.num_encoder_layers * (attn + ff + 2 * d)
    dec = u.num_decoder_layers * (2 * attn + ff + 3 * d)
    return (
        2 * u.vocab_size * d
        + enc
        + dec
        + 2 * u.relative_attention_num_buckets * u.num_heads
        + 2 * d
    )


def test_5b_preset_matches_closed_form_counts_and_the_paper_within_2_percent():
    model = load_config(CONFIGS / "models" / "pali3_5b.yaml").model
    rows = {row.name: row.params for row in parameter_table(model)}
    vision = rows["vision: SigLIP ViT (tokens)"]
    language = rows["language: UL2 encoder-decoder"]
    assert vision == _vit_formula(model.vit)
    assert language == _ul2_formula(model.ul2)
    assert (
        rows["PaLI-3 total"]
        == vision + language + model.vit.width * model.ul2.d_model + model.ul2.d_model
    )
    for name, value in (
        ("vision", vision),
        ("language", language),
        ("total", rows["PaLI-3 total"]),
    ):
        assert abs(value - PAPER[name]) / PAPER[name] < 0.02, (name, value)


def test_meta_count_equals_a_materialised_model():
    model = load_config(CONFIGS / "models" / "tiny.yaml").model
    rows = {row.name: row.params for row in parameter_table(model)}
    assert rows["PaLI-3 total"] == count(PaLI3(model))


def test_meta_counting_allocates_no_weights():
    model = load_config(CONFIGS / "models" / "pali3_5b.yaml").model
    with torch.device("meta"):
        pali3 = PaLI3(model)
    assert all(p.is_meta for p in pali3.parameters())


def test_cli_prints_the_table(capsys):
    assert main(["--model", str(CONFIGS / "models" / "pali3_5b.yaml")]) == 0
    out = capsys.readouterr().out
    for row in parameter_table(load_config(CONFIGS / "models" / "pali3_5b.yaml").model):
        assert row.name in out and f"{row.params:,}" in out


def test_cli_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vit: {widht: 3}}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(bad)])
    assert exit_info.value.code == 2
    assert "did you mean 'width'" in capsys.readouterr().err
