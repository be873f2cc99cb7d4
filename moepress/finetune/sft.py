"""Supervised fine-tuning data: prompt/answer pairs from a local .jsonl, tokenised so that the loss
falls on the answer tokens only.

A row is `{"prompt": ..., "answer": ...}` (the answer is appended to the prompt as written), or an
Alpaca/OwLore-style `{"instruction": ..., "input": ..., "output": ...}` (`input` optional), which is
put in the Alpaca prompt template those datasets were written for. The CD-MoE reference trains its
SFT stage on padded text with labels = input_ids, so the prompt and the padding are in its loss; we
set both to -100: padding is not text (its loss teaches the model to emit pad after pad, and how many
pad positions a batch has changes the weight each real token gets), and the prompt is given at test
time, so its loss only spends the small update budget on re-modelling questions instead of answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.errors import MoepressError

IGNORE = -100
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
_FIX = 'each line must be a JSON object with "prompt" and "answer" (or "instruction" and "output") strings'


@dataclass
class SftData:
    """Tokenised pairs, right-padded to the longest row: labels are -100 on prompt and padding."""

    input_ids: torch.Tensor  # [n, L]
    labels: torch.Tensor  # [n, L]
    attention_mask: torch.Tensor  # [n, L]
    skipped: int = 0  # rows whose prompt filled the whole max length (no answer token left)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _pair(row: object) -> tuple[str, str] | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str):
        return row["prompt"], row["answer"]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            return None
        template = _ALPACA_INPUT if extra.strip() else _ALPACA
        return template.format(instruction=row["instruction"], input=extra), row["output"]
    return None


def read_sft_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) per row of the .jsonl at `path`; any problem is one MoepressError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise MoepressError(f"SFT data {path} does not exist; pass a .jsonl file ({_FIX})")
    pairs: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoepressError(f"SFT data {path} line {n} is not valid JSON ({e.msg}); {_FIX}") from None
            pair = _pair(row)
            if pair is None:
                raise MoepressError(f"SFT data {path} line {n} has no prompt/answer; {_FIX}")
            if pair[1].strip():
                pairs.append(pair)
    if not pairs:
        raise MoepressError(f"SFT data {path} has no row with a non-empty answer; {_FIX}")
    return pairs


def tokenize_sft(tokenizer, pairs: list[tuple[str, str]], max_length: int = 256) -> SftData:
    """Prompt (with the tokenizer's special tokens, e.g. BOS) + answer + EOS, cut at `max_length`.

    Prompt and answer are tokenised separately so the answer's first token is exactly where the
    loss starts; a row whose prompt leaves no room for an answer token is skipped."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    rows: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + a)[:max_length]
        if len(p) >= len(ids):
            skipped += 1
            continue
        rows.append((ids, [IGNORE] * len(p) + ids[len(p) :]))
    if not rows:
        raise MoepressError(f"every SFT prompt is at least {max_length} tokens; shorten the prompts")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    return SftData(input_ids, labels, mask, skipped)


def load_sft(tokenizer, path: str | Path, max_length: int = 256) -> SftData:
    """`read_sft_pairs` then `tokenize_sft`."""
    return tokenize_sft(tokenizer, read_sft_pairs(path), max_length)
