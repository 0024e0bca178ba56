"""C4 / sample-corpus data pipeline: tokenizer, packing, rank and worker sharding, exact resume.

Names are imported on first use, so ``python -m data.tokenizer`` starts without torch.
"""

import importlib

_EXPORTS = {"DataConfig": "data.loader", "TrainLoader": "data.loader",
            "build_tokenizer": "data.loader", "build_train_loader": "data.loader",
            "build_val_batches": "data.loader", "Tokenizer": "data.tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
