"""Train loader and validation batches: packing, sharding over ranks and workers, exact resume,
bad input, and the hub code path fed C4-format shards from disk."""

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from data import DataConfig, build_tokenizer, build_train_loader, build_val_batches
from data.c4 import write_shard
from data.errors import DataError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box".split()


def doc_text(split: str, i: int) -> str:
    """Document ``i``: a unique head, then 4-15 words, so lengths vary."""
    return f"{split} doc {i:04d}. " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 12))


def write_split(directory, split, counts, extra=None):
    """Shards ``c4-{split}.0000f-of-0000n.json.gz`` with ``counts[f]`` documents each, C4's format.

    ``extra`` maps (file, index) to a raw line inserted there. Returns the texts in order.
    """
    os.makedirs(directory, exist_ok=True)
    texts, i = [], 0
    for f, count in enumerate(counts):
        docs = []
        for _ in range(count):
            docs.append({"text": doc_text(split, i), "timestamp": "2019-04-25T12:57:54Z",
                         "url": f"https://example.com/{split}/{i}"})
            texts.append(docs[-1]["text"])
            i += 1
        path = os.path.join(directory, f"c4-{split}.{f:05d}-of-{len(counts):05d}.json.gz")
        write_shard(path, docs)
        if extra:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            for (file, pos), raw in sorted(extra.items(), reverse=True):
                if file == f:
                    lines.insert(pos, raw)
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
    return texts


def row_texts(batch, tok):
    """The document in each truncate-mode row: its labels up to EOS, decoded."""
    out = []
    for labels in batch["labels"].tolist():
        ids = [t for t in labels if t != -100]
        assert ids[-1] == tok.eos_id, "row was cut: keep test documents shorter than seq_len"
        out.append(tok.decode(ids[:-1]))
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(DataConfig())


@pytest.fixture
def shards(tmp_path):
    """36 train documents in 3 shards (12 each: every consumer of 4 gets 9), 10 validation."""
    train = write_split(tmp_path, "train", [12, 12, 12])
    val = write_split(tmp_path, "validation", [10])
    return str(tmp_path), train, val


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_pack_rows_are_documents_joined_with_bos_eos_without_padding(shards, tok):
    directory, texts, _ = shards
    cfg = DataConfig(source=directory, seq_len=16)
    batches = take(build_train_loader(cfg, tok, batch_size=3), 4)
    stream = [t for text in texts for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]]
    rows = []
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (3, 16)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels shifted by one
        assert (b["labels"] != -100).all()  # no padding anywhere
        rows += [torch.cat([r[:1], l]).tolist() for r, l in zip(b["input_ids"], b["labels"])]
    assert [t for r in rows for t in r] == stream[:4 * 3 * 17]  # consecutive 17-token windows


def test_truncate_rows_hold_one_document_each_and_ignore_padding(tmp_path, tok):
    texts = write_split(tmp_path, "train", [6])
    seq_len = 25  # some documents are longer and get cut, others are padded
    batch = take(build_train_loader(DataConfig(source=str(tmp_path), seq_len=seq_len,
                                               packing="truncate"), tok, batch_size=6), 1)[0]
    cut = pad = 0
    for text, inp, lab in zip(texts, batch["input_ids"].tolist(), batch["labels"].tolist()):
        doc = ([tok.bos_id] + tok.encode(text) + [tok.eos_id])[:seq_len + 1]
        real = len(doc)
        window = doc + [tok.pad_id] * (seq_len + 1 - real)
        assert inp == window[:-1]
        assert lab == window[1:real] + [-100] * (seq_len + 1 - real)
        cut, pad = cut + (real == seq_len + 1), pad + (real < seq_len + 1)
    assert cut and pad


def _epoch_of_texts(loaders, tok, batches_per_loader):
    seen = []
    for loader in loaders:
        for b in take(loader, batches_per_loader):
            seen += row_texts(b, tok)
    return seen


def test_two_ranks_two_workers_yield_every_local_document_exactly_once(shards, tok):
    directory, texts, _ = shards
    cfg = DataConfig(source=directory, seq_len=64, packing="truncate", num_workers=2)
    loaders = [build_train_loader(cfg, tok, batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    # 36 documents / (2 ranks x 2 workers) = 9 each = 3 batches per worker, 6 per rank.
    seen = _epoch_of_texts(loaders, tok, 6)
    assert sorted(seen) == sorted(texts)
    assert all(ld.stats["epoch"] == 0 for ld in loaders)


@pytest.fixture
def hub_from_disk(monkeypatch, shards):
    """Route ``datasets.load_dataset("allenai/c4", "en", split, streaming=True)`` to C4 shards on disk.

    Only the download is replaced: the same streaming, column selection and node splitting run
    on json.gz files in C4's own format (timestamp included). Forked DataLoader workers inherit it.
    """
    import datasets
    directory, train, val = shards
    real = datasets.load_dataset
    calls = []

    def load_dataset(name, config=None, *, split, streaming, **kw):
        calls.append((name, config, split, streaming))
        assert (name, config, streaming) == ("allenai/c4", "en", True)
        pattern = os.path.join(directory, f"c4-{split}.*.json.gz")
        return real("json", data_files=pattern, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return train, val, calls


def test_hub_source_shards_c4_stream_over_ranks_and_workers_exactly_once(hub_from_disk, tok):
    texts, val, calls = hub_from_disk
    cfg = DataConfig(source="allenai/c4", seq_len=64, packing="truncate", num_workers=2)
    loaders = [build_train_loader(cfg, tok, batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(_epoch_of_texts(loaders, tok, 6)) == sorted(texts)
    vals = [build_val_batches(DataConfig(source="allenai/c4", seq_len=64, packing="truncate"), tok,
                              batch_size=5, num_batches=1, rank=r, world_size=2)[0] for r in (0, 1)]
    assert sorted(row_texts(vals[0], tok) + row_texts(vals[1], tok)) == sorted(val)
    # (train was loaded in the forked workers, whose calls this process does not see)
    assert calls == [("allenai/c4", "en", "validation", True)] * 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_hub_source_resumes_exactly(hub_from_disk, tok, num_workers):
    cfg = DataConfig(source="allenai/c4", seq_len=8, num_workers=num_workers)
    ref = take(build_train_loader(cfg, tok, batch_size=2), 9)
    first = build_train_loader(cfg, tok, batch_size=2)
    take(first, 5)
    state = first.state_dict()
    again = build_train_loader(cfg, tok, batch_size=2)
    again.load_state_dict(state)
    for a, b in zip(take(again, 4), ref[5:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from data import DataConfig, build_tokenizer, build_train_loader
    directory, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = build_tokenizer(DataConfig())
    for workers in (0, 2):
        cfg = DataConfig(source=directory, seq_len=16, num_workers=workers)
        loader = build_train_loader(cfg, tok, batch_size=2)
        loader.load_state_dict(torch.load(f"{work}/state{workers}.pt", weights_only=True))
        it = iter(loader)
        torch.save([next(it) for _ in range(n)], f"{work}/out{workers}.pt")
    assert "datasets" not in sys.modules, "a local source must not import datasets"
""")


def test_resume_in_a_new_process_yields_the_uninterrupted_batches(tmp_path, tok):
    data = tmp_path / "data"
    write_split(data, "train", [3, 2, 4])  # small: the 14 batches cross an epoch boundary
    expected = {}
    for workers in (0, 2):
        cfg = DataConfig(source=str(data), seq_len=16, num_workers=workers)
        ref = build_train_loader(cfg, tok, batch_size=2)
        expected[workers] = take(ref, 14)[7:]
        assert min(s["epoch"] for s in ref.state_dict()["streams"]) >= 1  # the source ran out
        loader = build_train_loader(cfg, tok, batch_size=2)
        take(loader, 7)  # odd: with 2 workers the next batch comes from the second one
        state = loader.state_dict()
        assert state["streams"][0]["buffer"].numel() > 0  # a document straddles the cut
        torch.save(state, tmp_path / f"state{workers}.pt")
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(data), str(tmp_path), "7"],
                   cwd=ROOT, check=True, timeout=120)
    for workers in (0, 2):
        got = torch.load(tmp_path / f"out{workers}.pt", weights_only=True)
        for a, b in zip(got, expected[workers], strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["labels"], b["labels"])


def test_loader_starts_the_next_epoch_when_the_source_runs_out(tmp_path, tok):
    texts = write_split(tmp_path, "train", [4])
    loader = build_train_loader(DataConfig(source=str(tmp_path), seq_len=64, packing="truncate"),
                                tok, batch_size=2)
    seen = [t for b in take(loader, 4) for t in row_texts(b, tok)]
    assert seen == texts + texts
    assert loader.state_dict()["streams"][0]["epoch"] == 1


def test_malformed_lines_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    bad = {(0, 1): "{not json", (0, 3): json.dumps({"url": "no text"}),
           (0, 4): json.dumps({"text": "  \n", "timestamp": "", "url": ""})}
    texts = write_split(tmp_path, "train", [5], extra=bad)
    loader = build_train_loader(DataConfig(source=str(tmp_path), seq_len=64, packing="truncate"),
                                tok, batch_size=5)
    with caplog.at_level(logging.WARNING):
        assert row_texts(take(loader, 1)[0], tok) == texts
    assert loader.stats["malformed_lines"] == 2
    assert loader.stats["empty_documents"] == 1
    assert "skipped 2 malformed lines" in caplog.text and "c4-train.00000-of-00001.json.gz:2" in caplog.text


def test_strict_mode_fails_on_a_malformed_line_naming_file_and_line(tmp_path, tok):
    write_split(tmp_path, "train", [5], extra={(0, 2): "{not json"})
    loader = build_train_loader(DataConfig(source=str(tmp_path), strict=True), tok, batch_size=2)
    with pytest.raises(ValueError, match=r"c4-train\.00000-of-00001\.json\.gz:3: malformed"):
        take(loader, 1)


def test_a_line_that_fails_to_decode_for_any_reason_is_skipped_and_counted(tmp_path, tok):
    deep = "[" * 200000  # json's decoder recurses per bracket: RecursionError, not a JSONDecodeError
    texts = write_split(tmp_path, "train", [4], extra={(0, 1): deep, (0, 2): json.dumps({"text": 7})})
    loader = build_train_loader(DataConfig(source=str(tmp_path), seq_len=64, packing="truncate"), tok, batch_size=4)
    assert row_texts(take(loader, 1)[0], tok) == texts
    assert loader.stats["malformed_lines"] == 2
    strict = build_train_loader(DataConfig(source=str(tmp_path), strict=True), tok, batch_size=2)
    with pytest.raises(DataError, match=r"json\.gz:2: malformed C4 line: RecursionError"):
        take(strict, 1)


def test_a_strict_failure_in_a_loader_worker_keeps_its_one_line_message(tmp_path, tok):
    write_split(tmp_path, "train", [5], extra={(0, 2): "{not json"})
    loader = build_train_loader(DataConfig(source=str(tmp_path), strict=True, num_workers=1), tok, batch_size=2)
    with pytest.raises(DataError) as error:
        take(loader, 1)
    message = str(error.value)  # not the worker's traceback, which the DataLoader puts in the message
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{tmp_path}/c4-train.00000-of-00001.json.gz:3: malformed C4 line: JSONDecodeError")


def test_an_unreachable_hub_is_one_line_naming_the_dataset(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # datasets refuses at once, as an unreachable hub does after retries
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as error:
        build_val_batches(DataConfig(source="allenai/c4"), tok, batch_size=2, num_batches=1)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("data.source = 'allenai/c4' (en, validation) cannot be opened on the hub (ConnectionError")
    assert message.endswith("or point data.source at a local directory of C4 shards")


def write_damaged_split(directory):
    """Two train shards: the first with a non-UTF-8 line at line 3, the second cut off mid-stream.

    Returns (texts a reader gets, number of lines the cut shard still yields).
    """
    os.makedirs(directory, exist_ok=True)
    docs = [{"text": doc_text("train", i), "timestamp": "", "url": ""} for i in range(70)]
    lines = [json.dumps(d).encode() for d in docs[:6]]
    lines.insert(2, b'{"text": "caf\xe9 au lait", "timestamp": "", "url": ""}')  # Latin-1, not UTF-8
    with gzip.open(os.path.join(directory, "c4-train.00000-of-00002.json.gz"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    cut = os.path.join(directory, "c4-train.00001-of-00002.json.gz")
    write_shard(cut, docs[6:])
    with open(cut, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[:len(data) * 2 // 3])  # truncated download: gzip raises EOFError mid-file
    readable = []
    with pytest.raises(EOFError), gzip.open(cut, "rt") as f:
        for line in f:
            readable.append(line)
    assert 5 < len(readable) < 60
    return [d["text"] for d in docs[:6 + len(readable)]], len(readable)


def test_undecodable_line_and_truncated_gzip_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    texts, readable = write_damaged_split(tmp_path)
    loader = build_train_loader(DataConfig(source=str(tmp_path), seq_len=64, packing="truncate"),
                                tok, batch_size=len(texts) + 1)  # one more: read past the cut
    with caplog.at_level(logging.WARNING):
        assert row_texts(take(loader, 1)[0], tok) == texts + texts[:1]
    assert loader.stats["malformed_lines"] == 2
    assert "malformed line" in caplog.text and "c4-train.00000-of-00002.json.gz:3: byte 13 is not UTF-8" in caplog.text
    assert f"the rest of the file from line {tmp_path}/c4-train.00001-of-00002.json.gz:{readable + 1}: " \
           "truncated or corrupt compressed data (EOFError" in caplog.text


def test_damage_is_counted_once_over_consumers(tmp_path, tok):
    from data.c4 import LocalShards, local_files

    texts, _ = write_damaged_split(tmp_path)
    source, got, malformed = LocalShards(local_files(str(tmp_path), "train")), [], 0
    for consumer in range(3):
        pos = source.start()
        got += list(source.documents(consumer, 3, pos))
        malformed += pos["malformed"]
    assert sorted(got) == sorted(texts) and malformed == 2


def test_strict_mode_fails_on_undecodable_line_and_truncated_gzip_naming_file_and_line(tmp_path, tok):
    _, readable = write_damaged_split(tmp_path)
    loader = build_train_loader(DataConfig(source=str(tmp_path), strict=True), tok, batch_size=2)
    with pytest.raises(ValueError, match=r"00000-of-00002\.json\.gz:3: malformed C4 line: byte 13 is not UTF-8"):
        take(loader, 1)
    os.remove(tmp_path / "c4-train.00000-of-00002.json.gz")
    loader = build_train_loader(DataConfig(source=str(tmp_path), strict=True), tok, batch_size=2)
    with pytest.raises(ValueError, match=rf"00001-of-00002\.json\.gz:{readable + 1}: unreadable C4 shard: "
                                         r"truncated or corrupt compressed data \(EOFError"):
        take(loader, 100)


def test_resume_across_skipped_lines_yields_the_uninterrupted_batches(tmp_path, tok):
    write_damaged_split(tmp_path)
    cfg = DataConfig(source=str(tmp_path), seq_len=16)
    expected = take(build_train_loader(cfg, tok, batch_size=2), 40)  # crosses both bad spots and an epoch
    for cut in (1, 7, 25):
        first = build_train_loader(cfg, tok, batch_size=2)
        take(first, cut)
        loader = build_train_loader(cfg, tok, batch_size=2)
        loader.load_state_dict(first.state_dict())
        for a, b in zip(take(loader, 40 - cut), expected[cut:], strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_missing_sources_are_errors_naming_the_path(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    write_split(tmp_path / "trainonly", "train", [2])
    cases = [(str(tmp_path / "nope"), "train", "nope"),
             (str(tmp_path / "x" / "c4-train.*.json.gz"), "train", "c4-train"),
             (str(tmp_path / "empty"), "train", "empty"),
             (str(tmp_path / "trainonly"), "validation", "trainonly")]
    for source, split, name in cases:
        with pytest.raises(FileNotFoundError, match=name):
            if split == "train":
                build_train_loader(DataConfig(source=source), tok, batch_size=1)
            else:
                build_val_batches(DataConfig(source=source), tok, batch_size=1, num_batches=1)


def test_validation_batches_are_fixed_and_disjoint_across_ranks(shards, tok):
    directory, _, val = shards
    cfg = DataConfig(source=directory, seq_len=64, packing="truncate")
    per_rank = [build_val_batches(cfg, tok, batch_size=5, num_batches=1, rank=r, world_size=2)
                for r in (0, 1)]
    again = build_val_batches(cfg, tok, batch_size=5, num_batches=1, rank=0, world_size=2)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(per_rank[0], again) for k in a)
    assert sorted(row_texts(per_rank[0][0], tok) + row_texts(per_rank[1][0], tok)) == sorted(val)
    packed = build_val_batches(DataConfig(source=directory, seq_len=16), tok, 2, num_batches=3)
    assert len(packed) == 3 and packed[0]["input_ids"].shape == (2, 16)


def test_config_rejects_impossible_values():
    for bad in [dict(packing="concat"), dict(seq_len=0), dict(num_workers=-1), dict(source=""),
                dict(strict="yes"), dict(seq_len=2.5)]:
        field = next(iter(bad))
        with pytest.raises(ValueError, match=f"data.{field}"):
            DataConfig(**bad)


def test_resume_refuses_a_state_from_a_different_layout(shards, tok):
    directory, _, _ = shards
    state = build_train_loader(DataConfig(source=directory), tok, batch_size=2).state_dict()
    other = build_train_loader(DataConfig(source=directory, num_workers=2), tok, batch_size=2)
    with pytest.raises(UserError, match="data.num_workers was 0, now 2; resume with the saved values"):
        other.load_state_dict(state)
    smaller = build_train_loader(DataConfig(source=directory), tok, batch_size=1)  # a changed micro batch
    with pytest.raises(UserError, match="train.micro_batch_size was 2, now 1"):
        smaller.load_state_dict(state)


def test_a_new_iterator_continues_where_the_last_one_stopped_and_retires_it(shards, tok):
    directory, _, _ = shards
    cfg = DataConfig(source=directory, seq_len=16)
    ref = take(build_train_loader(cfg, tok, batch_size=2), 6)
    loader = build_train_loader(cfg, tok, batch_size=2)
    first = iter(loader)
    got = [next(first) for _ in range(3)]
    second = iter(loader)
    got += [next(second) for _ in range(3)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, ref, strict=True))
    with pytest.raises(StopIteration):
        next(first)  # stale: it would otherwise repeat the second iterator's batches
