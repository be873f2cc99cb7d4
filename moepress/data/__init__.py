"""Calibration/evaluation text loading and packing."""

from moepress.data.text import TokenBatch, load_texts, load_tokens, pack

__all__ = ["TokenBatch", "load_texts", "load_tokens", "pack"]
