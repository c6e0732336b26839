"""Tests import the tiny local model builder from here; it lives in kubelora_local for the demo too."""

from kubelora_local.tinymodel import build_tiny_model, build_tokenizer, sample_rows, write_chat_dataset

__all__ = ["build_tiny_model", "build_tokenizer", "sample_rows", "write_chat_dataset"]
