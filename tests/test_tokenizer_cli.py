"""`python -m pali3_train.tokenizer`: training from text or JSONL files with T5's ids and task
markers as single pieces; a published-style ``spiece.model`` without the markers named as such by
``check`` and extended by ``add-symbols`` without moving any existing id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pali3_train.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer, main, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ["<caption>", "<vqa>"]
TEXTS = [
    f"a {c} {s} at the {p}"
    for c in ("red", "green", "blue")
    for s in ("circle", "square")
    for p in ("top", "bottom")
] * 3


def test_training_from_text_and_jsonl_files_equals_the_library_function(tmp_path):
    half = len(TEXTS) // 2
    (tmp_path / "a.txt").write_text("\n".join(TEXTS[:half]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"caption": t, "n": 1}) + "\n"
                                              for t in TEXTS[half:]))  # fmt: skip
    cases = (("txt", ["a.txt"], []), ("jsonl", ["b.jsonl"], ["--field", "caption"]))
    for name, inputs, field in cases:
        args = ["train", "--input", *[str(tmp_path / f) for f in inputs], *field]
        args += ["--vocab-size", "60", "--out", str(tmp_path / f"{name}.model")]
        assert main(args + [f"--symbol={m}" for m in MARKERS]) == 0
        texts = TEXTS[:half] if name == "txt" else TEXTS[half:]
        reference = train_tokenizer(texts=texts, vocab_size=60, special_symbols=MARKERS,
                                    model_path=tmp_path / f"{name}_ref.model")  # fmt: skip
        assert (tmp_path / f"{name}.model").read_bytes() == Path(reference.source).read_bytes()
        tokenizer = Tokenizer.load(tmp_path / f"{name}.model")
        assert tokenizer.missing(MARKERS) == []
        assert tokenizer.piece_id("<vqa>") in tokenizer.encode("<vqa> a red circle")


def test_a_jsonl_line_without_the_field_is_named(tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text('{"caption": "a red dot"}\n{"text": "x"}\n')
    args = ["train", "--input", str(tmp_path / "b.jsonl"), "--field", "caption"]
    assert main(args + ["--vocab-size", "30", "--out", str(tmp_path / "t.model")]) == 2
    assert "b.jsonl:2: not a JSON object with a 'caption' field" in capsys.readouterr().err


def test_a_published_style_model_without_markers_is_named_and_extended(tmp_path, capsys):
    # T5's spiece.model: unigram, T5's ids, no user-defined symbols (none can be downloaded here)
    published = train_tokenizer(texts=TEXTS, vocab_size=60, model_path=tmp_path / "spiece.model")
    assert (published.pad_id, published.eos_id, published.unk_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert main(["check", str(tmp_path / "spiece.model"), *[f"--symbol={m}" for m in MARKERS]]) == 1
    assert "not one piece (each would be split or become UNK): <caption>, <vqa>" in (
        capsys.readouterr().err
    )

    out = tmp_path / "mine.model"
    add = ["add-symbols", str(tmp_path / "spiece.model"), "--out", str(out)]
    assert main(add + [f"--symbol={m}" for m in MARKERS + ["<vqa>"]]) == 0
    size = published.vocab_size
    assert f"2 symbol(s) appended (ids {size}..{size + 1})" in capsys.readouterr().out
    extended = Tokenizer.load(out)
    assert [extended.piece_id(m) for m in MARKERS] == [size, size + 1]
    for text in TEXTS[:4]:  # every old id stays
        assert extended.encode(text) == published.encode(text)
    ids = extended.encode("<caption> a red circle")
    assert size in ids and ids.count(UNK_ID) == 0  # one piece (after SentencePiece's "▁")
    assert extended.decode(extended.encode("<caption> a red circle")) == "<caption> a red circle"
    assert main(["check", str(out), *[f"--symbol={m}" for m in MARKERS]]) == 0


def test_the_module_runs_from_the_command_line(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS))
    result = subprocess.run(
        [sys.executable, "-m", "pali3_train.tokenizer", "train", "--input", str(tmp_path / "a.txt"),
         "--vocab-size", "40", "--out", str(tmp_path / "t.model"), "--symbol", "<caption>"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert Tokenizer.load(tmp_path / "t.model").missing(["<caption>"]) == []
