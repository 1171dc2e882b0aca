"""The SentencePiece wrapper against the raw sentencepiece processor, plus its conventions."""

import pytest
import sentencepiece as spm
import torch

from pali3_train.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

MARKERS = ["<caption>", "<vqa>", "<lang:de>"]
CORPUS = ([f"a {c} {s} at the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
           for p in ("top", "bottom", "left corner")]
          + ["Größe und Übermaß für Bäume", "Привет мир, большой красный квадрат",
             "γεια σου κόσμε, ένα μπλε τετράγωνο"]) * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return train_tokenizer(texts=CORPUS, vocab_size=150, model_path=path, special_symbols=MARKERS), path


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
    tokenizer, _ = trained
    for marker in MARKERS:
        ids = tokenizer.encode(f"{marker} a red circle", add_eos=False)
        assert tokenizer.piece_id(marker) in ids
        assert tokenizer.decode([tokenizer.piece_id(marker)]) == marker
    with pytest.raises(KeyError, match="<ocr>"):
        tokenizer.piece_id("<ocr>")


@pytest.mark.parametrize("text", ["a blue circle at the top", "Größe und Übermaß",
                                  "Привет мир", "ένα μπλε τετράγωνο"])
def test_decode_inverts_encode_across_scripts(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_stops_at_eos_and_skips_pad(trained):
    tokenizer, _ = trained
    ids = tokenizer.encode("a red circle", add_eos=False)
    assert tokenizer.decode([PAD_ID] + ids + [EOS_ID] + ids) == "a red circle"


def test_batch_encode_pads_masks_and_truncates_like_single_encodes(trained):
    tokenizer, _ = trained
    texts = ["a red circle", "Привет мир, большой красный квадрат", ""]
    max_len = len(tokenizer.encode(texts[0]))  # the first fits exactly, the second is cut
    assert len(tokenizer.encode(texts[1])) > max_len
    ids, mask = tokenizer.batch_encode(texts, max_len)
    assert ids.shape == mask.shape == (3, max_len) and ids.dtype == torch.long
    for row, text in enumerate(texts):
        single = tokenizer.encode(text)
        if len(single) > max_len:
            single = single[:max_len - 1] + [EOS_ID]
        assert ids[row, :len(single)].tolist() == single
        assert (ids[row, len(single):] == PAD_ID).all()
        assert mask[row].tolist() == [i < len(single) for i in range(max_len)]
    assert tokenizer.batch_decode(ids)[0] == "a red circle"


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(texts=CORPUS, vocab_size=120, model_path=tmp_path / "a.model")
    b = train_tokenizer(texts=CORPUS, vocab_size=120, model_path=tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.vocab_size == b.vocab_size


def test_trains_from_files_and_tolerates_an_oversized_vocabulary(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:10]))
    tokenizer = train_tokenizer(files=[corpus], vocab_size=5000, model_path=tmp_path / "f.model")
    assert 3 < tokenizer.vocab_size < 5000


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer.load(garbage)


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    path = tmp_path / "bos.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(path)[:-6],
                                   vocab_size=200, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer.load(path)
