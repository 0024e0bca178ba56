"""SentencePiece tokenizer: a thin wrapper, a trainer, and a CLI to train one from C4 shards.

    python -m data.tokenizer train --input 'c4/c4-train.0000*-of-01024.json.gz' \
        --vocab-size 32000 --out c4_32k.model

Our trainer's settings make ``decode(encode(text)) == text`` for any text: no normalization
(``identity``), whitespace kept as it is, bytes for characters outside the vocabulary, newlines and
tabs as pieces of their own, and digits split so numbers never become giant pieces.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from data.c4 import open_shard
from data.errors import UserError

# Llama's layout: unk 0, bos 1, eos 2; we add an explicit pad so padded rows have a real id.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Longest line (in bytes) the trainer looks at; longer lines still encode, they just don't train.
MAX_LINE_BYTES = 4192


class Tokenizer:
    """A SentencePiece model with the ids the data pipeline needs.

    ``pad_id`` falls back to ``eos_id`` for models without a pad piece (Llama's, T5's): padded
    positions never carry loss, so any valid id will do as their input.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} does not exist; give a SentencePiece .model file "
                "(train one with `python -m data.tokenizer train`) or 'sample'")
        self.path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError ("INTERNAL: ...") for garbage
            raise UserError(f"tokenizer {model_path!r} is not a SentencePiece model ({str(e).strip()[:200]}); "
                            "pass a .model file (train one with `python -m data.tokenizer train`) or 'sample'") from None
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"tokenizer {model_path!r} has no BOS or EOS piece "
                             f"(bos_id={self.bos_id}, eos_id={self.eos_id}); packing needs both")
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def __reduce__(self):
        # DataLoader workers started with "spawn" rebuild the processor from its file.
        return (Tokenizer, (self.path,))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def check_fits(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding has fewer rows than the tokenizer has ids."""
        if self.vocab_size > model_vocab_size:
            raise UserError(
                f"tokenizer {self.path!r} has {self.vocab_size} pieces but the model's vocab_size is "
                f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding; set "
                f"model.vocab_size >= {self.vocab_size} or use a smaller tokenizer")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train a byte-fallback BPE model on ``texts`` (documents); returns the .model file's bytes.

    Deterministic: the same texts give the same bytes. Each line of a document is one training
    sentence; newlines come back as their own piece.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone takes 256 ids "
                         "plus 4 specials; use at least 300")

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip() and len(line.encode("utf-8")) <= MAX_LINE_BYTES:
                    yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=0.9999, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"], max_sentence_length=MAX_LINE_BYTES,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        input_sentence_size=0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def read_texts(paths: list[str]) -> Iterator[str]:
    """Texts of C4 shards (``*.json`` / ``*.json.gz`` lines with a ``text`` field) or plain text files."""
    for path in paths:
        with open_shard(path) as f:
            if ".json" in os.path.basename(path):
                for line in f:
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a broken line costs the tokenizer nothing
            else:
                yield f.read()


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths or globs, each pattern required to match something."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files += matched
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece BPE model")
    train.add_argument("--input", nargs="+", required=True,
                       help="C4 shards (.json/.json.gz) or text files; paths or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output .model path")
    args = parser.parse_args(argv)

    files = expand_inputs(args.input)
    model = train_tokenizer(read_texts(files), args.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({Tokenizer(args.out).vocab_size} pieces) from {len(files)} file(s)")


if __name__ == "__main__":
    main()
