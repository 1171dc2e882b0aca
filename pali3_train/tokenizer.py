"""SentencePiece tokenisation with the conventions PaLI-3's UL2 expects.

Ids follow T5: PAD=0 (also the decoder's start token), EOS=1, UNK=2, no BOS. Task markers such as
``<caption>`` are user-defined symbols, so each is always one piece and never split by the model.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, source: str):
        self._sp = processor
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SentencePiece model file here")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
        tokenizer = cls(processor, str(path))
        tokenizer._check_special_ids()
        return tokenizer

    def _check_special_ids(self) -> None:
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"{self.source}: special ids (pad, eos, unk) are {ids}; "
                             f"PaLI-3 needs {(PAD_ID, EOS_ID, UNK_ID)} (train with train_tokenizer)")

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece_id(self, symbol: str) -> int:
        """The id of a task marker; an error if it is not one known piece."""
        piece = self._sp.piece_to_id(symbol)
        if piece == UNK_ID or self._sp.id_to_piece(piece) != symbol:
            raise KeyError(f"{symbol!r} is not a single piece of {self.source}")
        return piece

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        return self._sp.encode(text) + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS; PAD is ignored."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID])

    def batch_encode(self, texts: Sequence[str], max_len: int,
                     add_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [B, max_len] right-padded with PAD, mask [B, max_len] True on real tokens).
        Over-long texts are cut to ``max_len`` keeping EOS as the last token, so a truncated
        target still teaches the model to stop."""
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        for row, text in enumerate(texts):
            tokens = self._sp.encode(text)[:max_len - 1 if add_eos else max_len]
            tokens += [EOS_ID] if add_eos else []
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = True
        return ids, mask

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row.tolist()) for row in ids]


def train_tokenizer(texts: Iterable[str] | None = None, files: Sequence[str | Path] = (), *,
                    vocab_size: int, model_path: str | Path, special_symbols: Sequence[str] = (),
                    model_type: str = "unigram", character_coverage: float = 1.0) -> Tokenizer:
    """Train on ``texts`` and/or text ``files`` (one sentence per line), write the model to
    ``model_path`` and return it loaded. Training is single-threaded with a fixed seed so the same
    corpus always gives the same file. ``vocab_size`` is an upper bound: a small corpus gets a
    smaller vocabulary rather than an error."""
    sentences = list(texts or [])
    for path in files:
        sentences += Path(path).read_text(encoding="utf-8").splitlines()
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        user_defined_symbols=list(special_symbols), hard_vocab_limit=False,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return Tokenizer.load(model_path)
