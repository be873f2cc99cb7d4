"""Calibration as separate documents, the way CD-MoE's reference code feeds them: each sequence is
the start of one document, BOS first, truncated to `seq_len` tokens.

The reference (duterscmy/CD-MoE `greedy_search_expert.py`) tokenises each of 100 C4 documents with
the tokenizer's special tokens (BOS) and `max_length=256, truncation=True`, runs them as separate
sequences and averages its metric per document, then over documents. Packed windows (`pack`) start
mid-document without BOS, which changes the hidden states of the first positions.

Choices: documents are picked with a seeded permutation (the reference uses all of its 100-document
file in order; a seed lets a larger file be sampled reproducibly). Documents shorter than `seq_len`
tokens are skipped, so the sequences form one [n, seq_len] tensor with no padding and a
per-document mean equals a per-token mean; how many were skipped is recorded on the batch. A .txt
file has no document boundaries, so its documents are runs of whole paragraphs (split at blank
lines) of at least `TXT_DOC_CHARS_PER_TOKEN × seq_len` characters, each starting at a paragraph.

Whole documents. The reference computes CD-MoE's fixed weights on the same documents UNTRUNCATED
(`get_weight/get_weight.py` tokenises with no max length), so the batch also carries each row's
document whole (`TokenBatch.documents`: BOS + every token, capped at the model's context length
`max_position_embeddings` when it is known — a longer document keeps its first
`max_position_embeddings` tokens — and uncapped when it is not).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.data.text import TokenBatch, check_shape, fingerprint_ids, load_texts
from moepress.errors import MoepressError

TXT_DOC_CHARS_PER_TOKEN = 8  # generous: English BPE is 3-5 characters a token


def paragraph_documents(texts: list[str], min_chars: int) -> list[str]:
    """Cut continuous text into documents of whole paragraphs, each at least `min_chars` long."""
    docs: list[str] = []
    current = ""
    for text in texts:
        for para in text.split("\n\n"):
            if not para.strip():
                continue
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= min_chars:
                docs.append(current)
                current = ""
    return docs


def bos_id(tokenizer) -> int | None:
    """The id the model expects first: the BOS token, else (GPT-2-style tokenizers) the EOS token."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def pack_documents(
    tokenizer,
    texts: list[str],
    n: int,
    seq_len: int,
    seed: int = 0,
    source: str = "",
    max_position: int | None = None,
) -> TokenBatch:
    """`n` documents with at least `seq_len` tokens, each as BOS + its first `seq_len` − 1 tokens; the
    same documents whole (capped at `max_position` tokens) in `documents`."""
    check_shape(n, seq_len, max_position, what="documents", example=100)
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[tuple[int, list[int], list[int]]] = []
    whole_body = None if max_position is None else max_position - (bos is not None)
    skipped = 0
    for d in order:
        ids = tokenizer(texts[d], add_special_tokens=False)["input_ids"]
        if len(ids) < body:
            skipped += 1
            continue
        first = [bos] if bos is not None else []
        rows.append((d, first + ids[:body], first + ids[:whole_body]))
        if len(rows) == n:
            break
    if len(rows) < n:
        raise MoepressError(
            f"data {source or 'text'} has {len(rows)} documents of at least {seq_len} tokens, too few for "
            f"{n}; give more documents or lower -n / --seq-len"
        )
    rows.sort()  # file order, so the batch does not depend on which documents were tokenised first
    ids = torch.tensor([r for _, r, _ in rows], dtype=torch.long)
    whole = [torch.tensor(w, dtype=torch.long) for _, _, w in rows]
    return TokenBatch(input_ids=ids, fingerprint=fingerprint_ids(ids), source=str(source), skipped_documents=skipped,
                      documents=whole)


def load_documents(
    tokenizer, source: str | Path, n: int, seq_len: int, seed: int = 0, text_field: str = "text",
    max_position: int | None = None,
) -> TokenBatch:
    """`load_texts` then `pack_documents`; a .txt file is first cut into paragraph documents."""
    texts = load_texts(source, text_field)
    if Path(source).suffix == ".txt":
        texts = paragraph_documents(texts, TXT_DOC_CHARS_PER_TOKEN * seq_len)
    return pack_documents(tokenizer, texts, n, seq_len, seed, str(source), max_position)
