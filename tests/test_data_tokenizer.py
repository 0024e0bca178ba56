"""SentencePiece wrapper and trainer: exact round trips, special ids, vocab check, CLI."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from data import DataConfig, Tokenizer, build_tokenizer
from data.sample import VALIDATION_FILE, ensure_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = ["", "\n", "  two leading spaces", "trailing  ", "tabs\tand\n\nblank lines\n",
          "x = 12345678 + 0.5e-3", "émoji 🙂, 中文, ﬁ ligature, \u00a0nbsp, \r\n",
          "    def f(a,  b):\n        return a  +  b\n"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(DataConfig())


def test_sample_tokenizer_round_trips_text_exactly(tok):
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    with gzip.open(os.path.join(ensure_sample(), VALIDATION_FILE), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert docs and all(tok.decode(tok.encode(d)) == d for d in docs)


def test_digits_are_split_and_newlines_are_pieces(tok):
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("year 2024\n")]
    assert pieces[-5:] == ["2", "0", "2", "4", "\n"]


def test_special_ids_bos_eos_and_a_distinct_pad(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids == [tok.bos_id] + tok.encode("hello") + [tok.eos_id]
    assert tok.decode(ids) == "hello"  # control pieces decode to nothing


def test_check_fits_refuses_a_model_vocab_smaller_than_the_tokenizer(tok):
    tok.check_fits(tok.vocab_size)
    tok.check_fits(tok.vocab_size + 1)
    with pytest.raises(ValueError, match=f"{tok.vocab_size} pieces.*vocab_size is {tok.vocab_size - 1}"):
        tok.check_fits(tok.vocab_size - 1)


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        Tokenizer(str(tmp_path / "nothere.model"))


def test_cli_trains_a_round_tripping_model_from_c4_shards_and_text(tmp_path):
    lines = [{"text": f"Shard line {i}: the parser reads {i * 37} tokens.\n  Indented  text.",
              "timestamp": "2019-04-25T12:57:54Z", "url": "u"} for i in range(200)]
    with gzip.open(tmp_path / "c4-train.00000-of-00001.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    (tmp_path / "notes.txt").write_text("Plain text files train too.\nWith several lines.\n" * 20)
    out = tmp_path / "tok.model"
    subprocess.run([sys.executable, "-m", "data.tokenizer", "train", "--input",
                    str(tmp_path / "c4-train.*.json.gz"), str(tmp_path / "notes.txt"),
                    "--vocab-size", "320", "--out", str(out)], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    trained = Tokenizer(str(out))
    assert trained.vocab_size == 320
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (1, 2, 3)
    for text in TRICKY + [lines[5]["text"]]:
        assert trained.decode(trained.encode(text)) == text
    missing = subprocess.run([sys.executable, "-m", "data.tokenizer", "train", "--input",
                              str(tmp_path / "none*.gz"), "--vocab-size", "320", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "none*.gz" in missing.stderr
