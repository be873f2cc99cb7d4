"""Calibration/evaluation text loading and packing."""

from moepress.data.documents import load_documents, pack_documents
from moepress.data.text import TokenBatch, load_texts, load_tokens, pack

__all__ = ["TokenBatch", "load_documents", "load_texts", "load_tokens", "pack", "pack_documents"]
