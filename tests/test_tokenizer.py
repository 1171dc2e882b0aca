"""The SentencePiece wrapper against the raw sentencepiece processor, plus its conventions."""

import pytest
import sentencepiece as spm
import torch

from pali3_train.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

MARKERS = ["<caption>", "<vqa>", "<lang:de>"]
CORPUS = (
    [
        f"a {c} {s} at the {p}"
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for p in ("top", "bottom", "left corner")
    ]
    + [
        "Größe und Übermaß für Bäume",
        "Привет мир, большой красный квадрат",
        "γεια σου κόσμε, ένα μπλε τετράγωνο",
    ]
) * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return train_tokenizer(
        texts=CORPUS, vocab_size=150, model_path=path, special_symbols=MARKERS
    ), path


def test_ids_equal_the_raw_sentencepiece_processor_plus_eos(trained):
    tokenizer, path = trained
    raw = spm.SentencePieceProcessor(model_file=str(path))
    for text in CORPUS[:5] + ["<caption> a red square"]:
        assert tokenizer.encode(text) == raw.encode(text) + [EOS_ID]
        assert tokenizer.encode(text, add_eos=False) == raw.encode(text)


def test_special_ids_follow_t5(trained):
    tokenizer, _ = trained
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)


def test_task_markers_are_single_pieces(trained):
    tokenizer, path = trained
    raw = spm.SentencePieceProcessor(model_file=str(path))
    ids = [tokenizer.piece_id(marker) for marker in MARKERS]
    assert len(set(ids)) == len(MARKERS) and not {0, 1, 2} & set(ids)
    for marker, marker_id in zip(MARKERS, ids):
        prompt = f"{marker} a red circle"
        # SentencePiece's dummy prefix may come first as a lone "▁"; the marker is never split.
        assert [p for p in raw.encode(prompt, out_type=str) if p != "▁"][0] == marker
        assert tokenizer.encode(prompt, add_eos=False).count(marker_id) == 1
        assert tokenizer.decode(tokenizer.encode(prompt)) == prompt
    # Not in the model / part of a marker / several pieces / special ids.
    for unknown in ("<ocr>", "<capt", "a red", "<pad>", "</s>", "<unk>"):
        with pytest.raises(KeyError, match=unknown):
            tokenizer.piece_id(unknown)


@pytest.mark.parametrize(
    "text", ["a blue circle at the top", "Größe und Übermaß", "Привет мир", "ένα μπλε τετράγωνο"]
)
def test_decode_inverts_encode_across_scripts(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_stops_at_eos_and_skips_pad(trained):
    tokenizer, _ = trained
    ids = tokenizer.encode("a red circle", add_eos=False)
    assert tokenizer.decode([PAD_ID] + ids + [EOS_ID] + ids) == "a red circle"
    assert tokenizer.decode(torch.tensor(ids[:1] + [PAD_ID] + ids[1:])) == "a red circle"


def test_ids_of_a_padded_model_vocabulary_decode_as_unk(trained):
    tokenizer, _ = trained
    red, circle = tokenizer.encode("red", add_eos=False), tokenizer.encode("circle", add_eos=False)
    padded = red + [tokenizer.vocab_size, tokenizer.vocab_size + 27] + circle
    expected = tokenizer.decode(red + [tokenizer.unk_id, tokenizer.unk_id] + circle)
    assert tokenizer.decode(padded) == expected and "red" in expected and "circle" in expected


def test_characters_outside_the_corpus_become_unk(trained):
    tokenizer, _ = trained
    assert tokenizer.unk_id in tokenizer.encode("a red 猫", add_eos=False)


@pytest.mark.parametrize("add_eos", [True, False])
def test_batch_encode_pads_masks_and_truncates_like_single_encodes(trained, add_eos):
    tokenizer, _ = trained
    texts = ["a red circle", "Привет мир, большой красный квадрат", ""]
    max_len = len(tokenizer.encode(texts[0], add_eos))  # the first fits exactly, the second is cut
    assert len(tokenizer.encode(texts[1], add_eos)) > max_len
    ids, mask = tokenizer.batch_encode(texts, max_len, add_eos=add_eos)
    assert ids.shape == mask.shape == (3, max_len)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    for row, text in enumerate(texts):
        single = tokenizer.encode(text, add_eos)
        if len(single) > max_len:
            single = single[: max_len - 1] + [EOS_ID] if add_eos else single[:max_len]
        assert ids[row, : len(single)].tolist() == single
        assert (ids[row, len(single) :] == PAD_ID).all()
        assert mask[row].tolist() == [i < len(single) for i in range(max_len)]
    assert tokenizer.batch_decode(ids)[0] == "a red circle"
    assert tokenizer.batch_decode(ids.tolist()) == tokenizer.batch_decode(ids)


def test_batch_encode_refuses_an_empty_length(trained):
    with pytest.raises(ValueError, match="max_len"):
        trained[0].batch_encode(["a red circle"], 0)


def test_training_is_deterministic(tmp_path):
    kwargs = dict(texts=CORPUS, vocab_size=120, special_symbols=MARKERS)
    a = train_tokenizer(**kwargs, model_path=tmp_path / "a.model")
    b = train_tokenizer(**kwargs, model_path=tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(CORPUS[-1]) == b.encode(CORPUS[-1])


def test_trains_from_files_and_tolerates_an_oversized_vocabulary(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:10]), encoding="utf-8")
    tokenizer = train_tokenizer(
        files=[corpus], vocab_size=5000, model_path=tmp_path / "new" / "dir" / "f.model"
    )
    assert 3 < tokenizer.vocab_size < 5000
    assert (tmp_path / "new" / "dir" / "f.model").is_file()


def test_files_are_read_as_one_sentence_per_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[10:]) + "\n", encoding="utf-8")
    train_tokenizer(
        texts=CORPUS[:10], files=[corpus], vocab_size=150, model_path=tmp_path / "mixed.model"
    )
    train_tokenizer(texts=CORPUS, vocab_size=150, model_path=tmp_path / "texts.model")
    assert (tmp_path / "mixed.model").read_bytes() == (tmp_path / "texts.model").read_bytes()


def test_an_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(texts=["", "  "], vocab_size=100, model_path=tmp_path / "e.model")


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer.load(garbage)


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    path = tmp_path / "bos.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(path)[:-6],
        vocab_size=200,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer.load(path)
