"""Corpus -> indexed dataset: document sources, tokenizer loading and the preprocess pipeline."""
from interop.data.preprocess import PreprocessConfig, PreprocessResult, preprocess

__all__ = ["PreprocessConfig", "PreprocessResult", "preprocess"]
