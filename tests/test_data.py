"""Calibration text from txt/jsonl/parquet, packed deterministically, with clear errors."""

from __future__ import annotations

import json

import pytest

from moepress.data import load_texts, load_tokens
from moepress.errors import MoepressError
from moepress.pipeline import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_formats_and_determinism(tmp_path, tok):
    docs = [f"document {i} " + "words and more words. " * 20 for i in range(10)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "source": "x"}) for d in docs))
    import pandas as pd

    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        a = load_tokens(tok, tmp_path / name, n=4, seq_len=32, seed=1)
        b = load_tokens(tok, tmp_path / name, n=4, seq_len=32, seed=1)
        assert a.input_ids.shape == (4, 32)
        assert (a.input_ids == b.input_ids).all() and a.fingerprint == b.fingerprint
    big = load_tokens(tok, tmp_path / "a.txt", n=2, seq_len=16, seed=1).input_ids
    other = load_tokens(tok, tmp_path / "a.txt", n=2, seq_len=16, seed=2).input_ids
    assert not (big == other).all()  # the seed chooses the windows


def test_source_filter(tmp_path):
    rows = [{"text": "alpha text", "source": "news"}, {"text": "beta text", "source": "fiction"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_texts(tmp_path / "d.jsonl", sources=["news"]) == ["alpha text"]


@pytest.mark.parametrize(
    "content, n, seq_len, needle",
    [
        ("", 1, 8, "no text"),
        ("short", 4, 64, "too few"),
        ("plenty of text " * 100, 0, 8, "positive"),
    ],
)
def test_bad_data(tmp_path, tok, content, n, seq_len, needle):
    (tmp_path / "d.txt").write_text(content)
    with pytest.raises(MoepressError, match=needle):
        load_tokens(tok, tmp_path / "d.txt", n=n, seq_len=seq_len)


def test_non_utf8_and_missing(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad bytes \xc3\x28")
    with pytest.raises(MoepressError, match="UTF-8"):
        load_tokens(tok, tmp_path / "bad.txt", n=1, seq_len=4)
    with pytest.raises(MoepressError, match="does not exist"):
        load_tokens(tok, tmp_path / "missing.txt", n=1, seq_len=4)
