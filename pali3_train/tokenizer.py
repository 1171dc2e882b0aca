"""SentencePiece tokenisation with the conventions PaLI-3's UL2 expects.

Ids follow T5: PAD=0 (also the decoder's start token), EOS=1, UNK=2, no BOS. Task markers such as
``<caption>`` are user-defined symbols, so each is always one piece and never split by the model.

    python -m pali3_train.tokenizer train --input texts.txt --vocab-size 32000 --out my.model \
        [--field text] [--symbol "<caption>" ...]
    python -m pali3_train.tokenizer check spiece.model [--symbol "<caption>" ...]
    python -m pali3_train.tokenizer add-symbols spiece.model --symbol "<caption>" --out mine.model

A published T5 / mT5 / UL2 ``spiece.model`` has T5's ids and loads as it is; it has no task markers,
so ``<caption>`` there is several pieces. ``check`` names the markers that are not one piece (exit
status 1), and ``add-symbols`` appends them as user-defined pieces after the existing ones: every
old id stays, and the new ids (from the old piece count on) must fit the model's vocabulary (T5
pads 32000 pieces to 32128 rows, mT5 250100 to 250112; the training checks refuse a tokenizer
larger than ``model.ul2.vocab_size``). Those rows are not blank in a pretrained checkpoint: HF's
T5 tokenizer numbers its span-corruption sentinels ``<extra_id_0..99>`` from 32099 down to 32000,
so the first marker appended to T5's model starts from ``<extra_id_99>``'s embedding.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

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

    def missing(self, symbols: Sequence[str]) -> list[str]:
        """Those of ``symbols`` that are not one piece (see ``piece_id``)."""
        return [symbol for symbol in symbols if not self._is_piece(symbol)]

    def _is_piece(self, symbol: str) -> bool:
        try:
            self.piece_id(symbol)
        except KeyError:
            return False
        return True

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


def add_symbols(model_path: str | Path, symbols: Sequence[str], out: str | Path) -> Tokenizer:
    """``model_path`` with those of ``symbols`` that are not yet one piece appended as
    user-defined pieces (ids from its piece count on), written to ``out``. Existing ids are
    unchanged, so a checkpoint trained with the original still reads its text the same way."""
    original = Tokenizer.load(model_path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    for symbol in dict.fromkeys(original.missing(symbols)):
        piece = proto.pieces.add()
        piece.piece, piece.score = symbol, 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return Tokenizer.load(out)


def read_texts(path: str | Path, field: str | None = None) -> Iterator[str]:
    """One text per line of ``path``; with ``field``, each line is a JSON object (JSONL) and its
    ``field`` is the text. Blank lines are skipped."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if field is None:
                yield line.rstrip("\n")
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number}: not a JSON object with a {field!r} field ({exc})"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: {field!r} is {type(text).__name__}, not text")
            yield text


def build_parser() -> argparse.ArgumentParser:
    from pali3_train.cli import command_parser, subcommand_options

    parser = command_parser("python -m pali3_train.tokenizer", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    options = subcommand_options()
    train = sub.add_parser("train", help="text files -> a SentencePiece model", **options)
    train.add_argument("--input", required=True, nargs="+", help="texts, one per line (or JSONL)")
    train.add_argument("--field", help="JSONL: the field holding each line's text")
    train.add_argument("--vocab-size", required=True, type=int, help="an upper bound")
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"),
                       help="SentencePiece's algorithm")  # fmt: skip
    train.add_argument("--character-coverage", type=float, default=1.0,
                       help="share of characters kept as pieces (lower: CJK text)")  # fmt: skip
    check = sub.add_parser("check", help="a model's ids, and which markers are not one piece",
                           **options)  # fmt: skip
    check.add_argument("model", help="a SentencePiece .model file")
    add = sub.add_parser("add-symbols", help="append markers that are not one piece", **options)
    add.add_argument("model", help="the SentencePiece .model file to extend")
    add.add_argument("--out", required=True, help="the extended .model file to write")
    for command in (train, check, add):
        command.add_argument(
            "--symbol", action="append", default=[], required=command is add,
            help='a task marker to keep as one piece, e.g. "<caption>" (repeatable)',
        )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            texts = (text for path in args.input for text in read_texts(path, args.field))
            tokenizer = train_tokenizer(
                texts, vocab_size=args.vocab_size, model_path=args.out,
                special_symbols=args.symbol, model_type=args.model_type,
                character_coverage=args.character_coverage,
            )  # fmt: skip
            print(f"wrote {args.out}: {tokenizer.vocab_size} pieces")
            return 0
        if args.command == "add-symbols":
            before = Tokenizer.load(args.model).vocab_size
            tokenizer = add_symbols(args.model, args.symbol, args.out)
            new = range(before, tokenizer.vocab_size)
            ids = f"ids {new.start}..{new.stop - 1}" if new else "every symbol is one piece already"
            print(f"wrote {args.out}: {len(new)} symbol(s) appended ({ids})")
            return 0
        tokenizer = Tokenizer.load(args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: {tokenizer.vocab_size} pieces; pad {PAD_ID}, eos {EOS_ID}, unk {UNK_ID}")
    missing = tokenizer.missing(args.symbol)
    for symbol in args.symbol:
        if symbol not in missing:
            print(f"{symbol}\t{tokenizer.piece_id(symbol)}")
    if missing:
        print(
            f"not one piece (each would be split or become UNK): {', '.join(missing)}; append "
            "them with `add-symbols`, or write prompts without them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
