"""Calibration and evaluation text: local .txt / .jsonl / .parquet files or a Hugging Face dataset
name, tokenised with the model's own tokenizer and packed into N sequences of length L."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.errors import MoepressError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class TokenBatch:
    """Packed token ids [n, seq_len] plus a fingerprint (sha256 of the ids) for provenance."""

    input_ids: torch.Tensor
    fingerprint: str
    source: str
    skipped_documents: int = 0  # documents layout: shorter than seq_len, not used
    # documents layout: each row's document WHOLE (BOS first, capped at the model's context length), for
    # CD-MoE's fixed weights (`data.documents`); None for packed windows
    documents: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def load_texts(source: str | Path, text_field: str = "text", sources: list[str] | None = None) -> list[str]:
    """Documents from a local file, or from a Hugging Face dataset `name[:config][@split]` when online.

    `sources` keeps only jsonl/parquet rows whose `source` field is listed (domain studies).
    """
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise MoepressError(f"data file {path} does not exist; pass a .txt, .jsonl or .parquet file")
        texts = _read_local(path, text_field, sources)
    else:
        texts = _read_hub(str(source), text_field)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise MoepressError(f"data {source} holds no text; give a file with at least one non-empty document")
    return texts


def _read_local(path: Path, text_field: str, sources: list[str] | None) -> list[str]:
    if path.suffix == ".txt":
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MoepressError(f"{path} is not UTF-8 text; convert it (e.g. `iconv -t utf-8`)") from None
        # One continuous stream, cut at paragraph breaks into pieces the tokenizer handles quickly;
        # the pieces keep their separators, so no EOS goes between them (see `pack`).
        return _chunks(raw)
    import datasets

    kind = "json" if path.suffix == ".jsonl" else "parquet"
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise MoepressError(f"cannot read {path} as {kind}: {str(err).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise MoepressError(f"{path} has no '{text_field}' field (fields: {ds.column_names}); use --text-field")
    if sources is not None:
        if "source" not in ds.column_names:
            raise MoepressError(f"{path} has no 'source' field to filter on")
        ds = ds.filter(lambda row: row["source"] in sources)
    return list(ds[text_field])


TXT_CHUNK_CHARS = 50_000


def _chunks(raw: str) -> list[str]:
    out, start = [], 0
    while start < len(raw):
        end = raw.find("\n\n", start + TXT_CHUNK_CHARS)
        end = len(raw) if end < 0 else end + 2
        out.append(raw[start:end])
        start = end
    return out


def _read_hub(name: str, text_field: str) -> list[str]:
    import datasets

    split = "train"
    if "@" in name:
        name, split = name.split("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, ...
        raise MoepressError(
            f"cannot load dataset {name!r} ({str(err).splitlines()[0][:120]}); "
            "pass a local .txt/.jsonl/.parquet file instead"
        ) from None
    return list(ds[text_field])


def check_shape(n: int, seq_len: int, max_position: int | None, what: str = "sequences", example: int = 128) -> None:
    """One-line errors for a calibration shape the model cannot take."""
    if n <= 0:
        raise MoepressError(f"number of {what} must be positive (got {n}); use -n {example} for example")
    if seq_len < 2:
        raise MoepressError(f"sequence length must be at least 2 (got {seq_len})")
    if max_position is not None and seq_len > max_position:
        raise MoepressError(
            f"sequence length {seq_len} exceeds the model's maximum {max_position}; use --seq-len {max_position}"
        )


def pack(
    tokenizer,
    texts: list[str],
    n: int,
    seq_len: int,
    seed: int = 0,
    source: str = "",
    max_position: int | None = None,
) -> TokenBatch:
    """Tokenise documents (EOS between them), cut the stream into windows of `seq_len`, and pick `n`
    of them with a seeded permutation, so the same text and seed give the same ids."""
    check_shape(n, seq_len, max_position)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = n * seq_len
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None and not text.endswith("\n\n"):
            stream.append(eos)
        if len(stream) >= needed * 4:  # enough to choose from; avoids tokenising huge corpora
            break
    windows = len(stream) // seq_len
    if windows < n:
        raise MoepressError(
            f"data {source or 'text'} has {len(stream)} tokens, too few for {n} sequences of {seq_len}; "
            "give more text or lower -n / --seq-len"
        )
    ids = torch.tensor(stream[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:n].sort().values
    ids = ids[pick].contiguous()
    return TokenBatch(input_ids=ids, fingerprint=fingerprint_ids(ids), source=str(source))


def fingerprint_ids(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def load_tokens(
    tokenizer, source: str | Path, n: int, seq_len: int, seed: int = 0, text_field: str = "text",
    max_position: int | None = None,
) -> TokenBatch:
    """`load_texts` then `pack`: the one call calibration and evaluation use."""
    if n <= 0:
        raise MoepressError(f"number of sequences must be positive (got {n}); use -n 128 for example")
    return pack(tokenizer, load_texts(source, text_field), n, seq_len, seed, str(source), max_position)
