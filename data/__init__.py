"""C4 / sample-corpus data pipeline: tokenizer, packing, rank and worker sharding, exact resume."""

from data.loader import (DataConfig, TrainLoader, build_tokenizer, build_train_loader,
                         build_val_batches)
from data.tokenizer import Tokenizer

__all__ = ["DataConfig", "TrainLoader", "Tokenizer", "build_tokenizer", "build_train_loader",
           "build_val_batches"]
