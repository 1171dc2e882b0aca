"""SentencePiece tokenisation with the conventions PaLI-3's UL2 expects.

Ids follow T5: PAD=0 (also the decoder's start token), EOS=1, UNK=2, no BOS. Task markers such as
``<caption>`` are user-defined symbols, so each is always one piece and never split by the model.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
import torch

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """A loaded SentencePiece model whose special ids are checked to be T5's, so the ids it
    produces can be fed to UL2 checkpoints and to our loss masks without remapping."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str):
        self._sp = processor
        self.source = source
        ids = (processor.pad_id(), processor.eos_id(), processor.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"{source}: special ids (pad, eos, unk) are {ids}; "
                f"PaLI-3 needs {(PAD_ID, EOS_ID, UNK_ID)} (train with train_tokenizer)"
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SentencePiece model file here")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
        return cls(processor, str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def piece_id(self, symbol: str) -> int:
        """The id of a task marker; a KeyError if it is not one known piece, so a typo in a
        prompt template fails loudly instead of silently becoming UNK or several pieces.
        PAD/EOS/UNK are refused too: they are not text and never appear in ``encode`` output."""
        piece = self._sp.piece_to_id(symbol)
        if self._sp.is_unknown(piece) or self._sp.is_control(piece):
            raise KeyError(f"{symbol!r} is not a single piece of {self.source}")
        return piece

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        return self._sp.encode(text) + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text up to the first EOS, because generated rows run on past it; PAD (a control
        piece) decodes to nothing, so padded rows need no stripping. Ids past the tokenizer's
        pieces (a model's vocabulary is often padded, as T5's 32128 for 32000 pieces, and an
        untrained model picks them) decode as UNK."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        size = self.vocab_size
        return self._sp.decode([i if 0 <= i < size else UNK_ID for i in ids])

    def batch_encode(
        self, texts: Sequence[str], max_len: int, add_eos: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [B, max_len] long, right-padded with PAD; mask [B, max_len] bool, True on real
        tokens). Over-long texts are cut to ``max_len`` keeping EOS as the last token, so a
        truncated target still teaches the model to stop."""
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        # On the CPU, wherever the model is: tokenising is host work, its callers move batches.
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool, device="cpu")
        for row, text in enumerate(texts):
            tokens = self._sp.encode(text)[: max_len - 1 if add_eos else max_len]
            tokens += [EOS_ID] if add_eos else []
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device="cpu")
            mask[row, : len(tokens)] = True
        return ids, mask

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in ids]


def copy_beside(weights: str | Path) -> Path:
    """Where an exported weights file keeps its tokenizer: ``model.safetensors`` ->
    ``model.spiece.model`` in the same folder, so the pair moves together."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".spiece.model")


def recorded_tokenizer(weights: str | Path, recorded: str | None) -> Path | None:
    """The tokenizer a weights file's metadata names: a relative name (the copy an export writes
    beside the weights) resolves against the weights' folder, wherever it has moved; an absolute
    path (files exported before the copy existed) is taken as it is."""
    if recorded is None:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else Path(weights).parent / path


def train_tokenizer(
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    *,
    vocab_size: int,
    model_path: str | Path,
    special_symbols: Sequence[str] = (),
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> Tokenizer:
    """Train on ``texts`` and/or text ``files`` (one sentence per line), write the model to
    ``model_path`` and return it loaded.

    Training is reproducible: one thread, input in the given order and every sentence used (no
    sampling), so nothing random is left to seed and the same corpus gives a byte-identical file.
    ``vocab_size`` is an upper bound: a small corpus gets a smaller vocabulary rather than an error.
    """
    sentences = [s for s in _sentences(texts, files) if s.strip()]
    if not sentences:
        raise ValueError(f"no text to train the tokenizer for {model_path} on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        user_defined_symbols=list(special_symbols),
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return Tokenizer.load(model_path)


def _sentences(texts: Iterable[str] | None, files: Sequence[str | Path] | None) -> Iterator[str]:
    yield from texts or ()
    for path in files or ():
        with open(path, encoding="utf-8") as lines:
            yield from (line.rstrip("\n") for line in lines)
