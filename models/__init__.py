"""Llama model zoo: the model, its sizes, and Hugging Face conversion (models.hf)."""

from models.llama import Llama, LlamaConfig
from models.sizes import PAPER_RANK, SIZES, build_model, count_parameters, flops_per_token, get_config

__all__ = ["Llama", "LlamaConfig", "SIZES", "PAPER_RANK", "build_model",
           "count_parameters", "flops_per_token", "get_config"]
