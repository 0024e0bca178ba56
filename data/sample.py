"""The bundled sample corpus: Python's own documentation, in C4's shard format, plus a tokenizer.

The text ships with every Python: the language reference topics (``pydoc_data.topics``) and the
docstrings of the standard library, read from source with ``ast`` (no module is imported). On
first use it is written once into ``$SUBTRACK_CACHE/sample`` (default
``~/.cache/subtrack-pretrain/sample``):

    c4-train.00000-of-00001.json.gz        ~95% of the documents
    c4-validation.00000-of-00001.json.gz   every 20th document
    tokenizer.model                        SentencePiece BPE, VOCAB_SIZE pieces, trained on train
    manifest.json                          version, Python version, documents and bytes per split

The build is deterministic (same bytes each time for one Python version) and atomic: it is
written into a temporary directory and renamed, so racing processes or an interrupted build never
leave a half-written cache.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile

from data.c4 import write_shard
from data.tokenizer import train_tokenizer

# 8192 beat 4096 on configs/tiny_sample.yaml at step 100: eval loss 9.03 -> 6.44 (2.70 bits per
# byte) against 8.35 -> 6.25 (2.87 bits per byte).
VOCAB_SIZE = 8192
VALIDATION_EVERY = 20  # every 20th document is held out: 5%
TRAIN_FILE = "c4-train.00000-of-00001.json.gz"
VALIDATION_FILE = "c4-validation.00000-of-00001.json.gz"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"
VERSION = 4  # bump when the corpus or tokenizer recipe changes: caches of other versions rebuild
# C4 lines carry a crawl timestamp; ours is fixed so the shards are byte-identical across builds.
TIMESTAMP = "2019-04-25T12:00:00Z"
# Documents are shuffled once, with this seed, when the corpus is built: read in source order the
# stream moves from the language reference to one library area after another, and every
# optimizer's eval loss rose at step 200 as the topic changed.
SHUFFLE_SEED = 0
# Stdlib packages that are tests, demos, GUIs or vendored code rather than documentation.
SKIP = {"idlelib", "test", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "this",
        "antigravity"}


def cache_dir() -> str:
    """Where the sample lives: ``$SUBTRACK_CACHE/sample`` or ``~/.cache/subtrack-pretrain/sample``."""
    root = os.environ.get("SUBTRACK_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "subtrack-pretrain")
    return os.path.join(root, "sample")


def _module_files() -> list[tuple[str, str]]:
    """(name, source path) of each public top-level stdlib module (``x.py`` or ``x/__init__.py``)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        for path in (os.path.join(stdlib, name + ".py"), os.path.join(stdlib, name, "__init__.py")):
            if os.path.isfile(path):
                out.append((name, path))
                break
    return out


def _module_texts(name: str, path: str) -> list[tuple[str, str]]:
    """(name, text) documents of one module: its docstring with the public functions', then one
    per public class (class docstring, then its methods'). Kept apart so documents stay C4-sized."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)

    def functions(body: list[ast.stmt], prefix: str) -> list[str]:
        return [f"{prefix}{node.name}()\n{ast.get_docstring(node)}" for node in body
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not node.name.startswith("_") and ast.get_docstring(node)]

    docs = []
    head = [ast.get_docstring(tree) or ""] + functions(tree.body, name + ".")
    docs.append((name, "\n\n".join(p for p in head if p)))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            qual = f"{name}.{node.name}"
            parts = [ast.get_docstring(node) or ""] + functions(node.body, qual + ".")
            docs.append((qual, "\n\n".join(p for p in parts if p)))
    return [(n, f"{n}\n\n{t}") for n, t in docs if t]


def documents() -> list[dict]:
    """Every document of the corpus in a fixed, shuffled order: ``{"text", "timestamp", "url"}``."""
    from pydoc_data.topics import topics

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append({"text": text, "timestamp": TIMESTAMP,
                         "url": f"https://docs.python.org/{version}/reference/#{key}"})
    for name, path in _module_files():
        try:
            texts = _module_texts(name, path)
        except (SyntaxError, UnicodeDecodeError):
            continue  # a stdlib file this Python cannot parse holds no docs we need
        for qual, text in texts:
            docs.append({"text": text, "timestamp": TIMESTAMP,
                         "url": f"https://docs.python.org/{version}/library/{name}.html#{qual}"})
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def _python() -> str:
    return sys.version.split()[0]


def build(out_dir: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Write shards, tokenizer and manifest into ``out_dir`` (created; must not exist yet)."""
    docs = documents()
    val = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    os.makedirs(out_dir)
    write_shard(os.path.join(out_dir, TRAIN_FILE), train)
    write_shard(os.path.join(out_dir, VALIDATION_FILE), val)
    model_path = os.path.join(out_dir, TOKENIZER_FILE)
    with open(model_path, "wb") as f:
        f.write(train_tokenizer((d["text"] for d in train), vocab_size))
    manifest = {"version": VERSION, "python": _python(), "vocab_size": vocab_size}
    for split, part in (("train", train), ("validation", val)):
        manifest[f"{split}_documents"] = len(part)
        manifest[f"{split}_bytes"] = sum(len(d["text"].encode("utf-8")) for d in part)
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def is_current(directory: str) -> bool:
    """A finished build of this corpus version for this Python (the manifest is written last)."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("version") == VERSION and manifest.get("python") == _python()


def ensure_sample(directory: str | None = None) -> str:
    """The sample directory, built first if missing or stale. Safe when processes race."""
    final = directory or cache_dir()
    if is_current(final):
        return final
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sample-build-", dir=parent)
    try:
        build(os.path.join(tmp, "new"))
        try:
            os.rename(os.path.join(tmp, "new"), final)
        except OSError:
            if not is_current(final):
                # A stale or broken copy is in the way: move it aside, then put ours in place.
                os.rename(final, os.path.join(tmp, "old"))
                os.rename(os.path.join(tmp, "new"), final)
            # else another process finished first; its copy has the same bytes, keep it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sample_files(split: str) -> list[str]:
    """The sample's shard for ``split`` ("train" or "validation"), building the sample if needed."""
    name = {"train": TRAIN_FILE, "validation": VALIDATION_FILE}[split]
    return [os.path.join(ensure_sample(), name)]


def sample_tokenizer_path() -> str:
    return os.path.join(ensure_sample(), TOKENIZER_FILE)


if __name__ == "__main__":
    path = ensure_sample()
    with open(os.path.join(path, MANIFEST_FILE)) as f:
        print(path, f.read())
