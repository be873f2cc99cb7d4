"""Perplexity of a model (original or compressed, in memory) on token ids of held-out text.

Documents are cut into windows of `window` tokens every `stride` tokens. With the default
stride = window the windows do not overlap and each window scores all its tokens but the first;
with stride < window each window scores only the tokens the previous one did not reach, so every
scored token sees at least `window - stride` tokens of context (the sliding-window perplexity of
the Hugging Face guide). A token budget keeps CPU runs short.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moepress.errors import MoepressError
from moepress.progress import progress

DEFAULT_WINDOW = 2048
# Token rows scored at a time when turning logits into NLL: bounds the float32 copy of the logits.
SCORE_CHUNK = 1024

Ids = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class Perplexity:
    """exp(nll); `nll` is the mean negative log-likelihood per scored token in nats."""

    ppl: float
    nll: float
    tokens: int
    window: int
    stride: int


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of document `doc` go in; targets [first, end) are scored."""

    doc: int
    start: int
    end: int
    first: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def scored(self) -> int:
        return self.end - self.first


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def documents(ids: Ids, max_tokens: int | None = None) -> list[torch.Tensor]:
    """1-D ids (one stream), 2-D ids (one document per row) or a list of 1-D ids, cut to the budget."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            docs = [ids]
        elif ids.dim() == 2:
            docs = list(ids.unbind(0))
        else:
            raise MoepressError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    else:
        docs = [torch.as_tensor(d).reshape(-1) for d in ids]
    if max_tokens is not None:
        if max_tokens < 2:
            raise MoepressError(f"max_tokens must be at least 2 (got {max_tokens})")
        kept, left = [], max_tokens
        for d in docs:
            if left <= 0:
                break
            kept.append(d[:left])
            left -= len(kept[-1])
        docs = kept
    return [d.long() for d in docs if len(d) >= 2]


def sliding_windows(length: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows over a document of `length` tokens; every target but the document's first is scored once."""
    if window < 2:
        raise MoepressError(f"window must be at least 2 tokens (got {window})")
    if not 1 <= stride <= window:
        raise MoepressError(f"stride must be between 1 and the window ({window}); got {stride}")
    out: list[Window] = []
    start, prev_end = 0, 0
    while True:
        end = min(start + window, length)
        first = max(start + 1, prev_end)
        if end > first:
            out.append(Window(doc, start, end, first))
        if end >= length:
            return out
        prev_end, start = end, start + stride


def default_window(model: nn.Module) -> int:
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(DEFAULT_WINDOW, max_pos) if max_pos else DEFAULT_WINDOW


def supports_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def window_logits(model: nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions [B, keep, V]; asks the model for only those when it can."""
    if keep < input_ids.shape[1] and supports_logits_to_keep(model):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[:, -keep:]


def batched_windows(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Batches of windows of the same shape, so no padding (and no attention mask) is ever needed."""
    groups: dict[tuple[int, int], list[Window]] = defaultdict(list)
    for w in windows:
        groups[(w.length, w.scored)].append(w)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: Ids,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> Perplexity:
    """Perplexity of `model` on `ids` (see the module docstring for windows and stride).

    `max_tokens` caps how many input tokens are read (documents are taken in order). The model runs
    on its own device in its own dtype; NLL is accumulated in float64 from float32 log-softmax.
    """
    window = window or default_window(model)
    stride = stride or window
    docs = documents(ids, max_tokens)
    windows = [w for i, d in enumerate(docs) for w in sliding_windows(len(d), window, stride, i)]
    if not windows:
        raise MoepressError("no tokens to score; give at least 2 tokens of text (or a larger max_tokens)")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in progress(batched_windows(windows, batch_size), "perplexity"):
            inputs = torch.stack([docs[w.doc][w.start : w.end] for w in batch]).to(device)
            n = batch[0].scored
            # logits at positions first-1 .. end-2 predict targets first .. end-1
            logits = window_logits(model, inputs, n + 1)[:, :-1]
            targets = inputs[:, -n:]
            total_nll += token_nll_sum(logits, targets)
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return Perplexity(ppl=math.exp(nll), nll=nll, tokens=total_tokens, window=window, stride=stride)


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = SCORE_CHUNK) -> float:
    """Σ −log p(target) over all positions, upcasting `chunk` rows of logits to float32 at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    total = 0.0
    for i in range(0, flat.shape[0], chunk):
        nll = F.cross_entropy(flat[i : i + chunk].float(), tgt[i : i + chunk], reduction="sum")
        total += float(nll.double())
    return total


def load_eval_ids(
    tokenizer, source: str | Path, max_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """One 1-D token stream from a local .txt/.jsonl/.parquet file (EOS between jsonl/parquet rows).

    Tokenising stops once `max_tokens` are read, so a small budget on a large file stays quick.
    """
    from moepress.data import load_texts

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in load_texts(source, text_field):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        # .txt files come back in pieces cut at paragraph breaks: they join with no EOS
        if eos is not None and not text.endswith("\n\n"):
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < 2:
        raise MoepressError(f"{source} gives fewer than 2 tokens; give more text")
    return torch.tensor(stream, dtype=torch.long)
