"""How far a compressed model's next-token distributions moved from the original's.

KL(P_orig ‖ Q_comp), Jensen-Shannon divergence (nats) and top-1 agreement, per token, over the same
token ids. Everything is computed from logits a chunk of token positions at a time, so the float32
probabilities of [all tokens × vocab] never exist at once (102k vocab × 2k tokens is 0.8 GB).
JS uses log-probabilities throughout: log M = logaddexp(log P, log Q) − log 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.evaluate.perplexity import (
    Ids,
    batched_windows,
    default_window,
    documents,
    model_device,
    sliding_windows,
)
from moepress.progress import progress

DEFAULT_CHUNK = 1024
LOG2 = math.log(2.0)


@dataclass
class DivergenceSums:
    """Running sums over token positions; `mean()` turns them into per-token averages."""

    kl: float = 0.0
    js: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, other: DivergenceSums) -> None:
        self.kl += other.kl
        self.js += other.js
        self.agree += other.agree
        self.tokens += other.tokens

    def mean(self) -> Divergence:
        if self.tokens == 0:
            raise MoepressError("no token positions to compare; give at least one token")
        n = self.tokens
        return Divergence(kl=self.kl / n, js=self.js / n, top1_agreement=self.agree / n, tokens=n)


@dataclass
class Divergence:
    """Per-token means: KL(original ‖ compressed) and JS in nats, top-1 agreement in [0, 1]."""

    kl: float
    js: float
    top1_agreement: float
    tokens: int


def _xlogy_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p·(log p − log q) per row; terms with p = 0 are 0 even where log q = −inf."""
    p = logp.exp()
    term = p * (logp - logq)
    return torch.where(p > 0, term, torch.zeros_like(term)).sum(-1)


def divergence_sums(
    logits_p: torch.Tensor, logits_q: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> DivergenceSums:
    """Sums of KL(P‖Q), JS(P,Q) and argmax agreement over all positions of two [..., V] logits tensors."""
    if logits_p.shape != logits_q.shape:
        raise MoepressError(
            f"logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}; "
            "compare models with the same vocabulary on the same ids"
        )
    if chunk < 1:
        raise MoepressError(f"chunk must be positive (got {chunk})")
    vocab = logits_p.shape[-1]
    p_flat = logits_p.reshape(-1, vocab)
    q_flat = logits_q.reshape(-1, vocab).to(p_flat.device)
    sums = DivergenceSums()
    for i in range(0, p_flat.shape[0], chunk):
        logp = torch.log_softmax(p_flat[i : i + chunk].float(), dim=-1)
        logq = torch.log_softmax(q_flat[i : i + chunk].float(), dim=-1)
        logm = torch.logaddexp(logp, logq) - LOG2
        js = 0.5 * (_xlogy_diff(logp, logm) + _xlogy_diff(logq, logm))
        sums.kl += float(_xlogy_diff(logp, logq).clamp_min(0).double().sum())
        sums.js += float(js.clamp_min(0).double().sum())
        sums.agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        sums.tokens += logp.shape[0]
    return sums


def divergence_from_logits(
    logits_p: torch.Tensor, logits_q: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> Divergence:
    """Per-token mean KL(P‖Q), JS and top-1 agreement of two logits tensors of the same shape."""
    return divergence_sums(logits_p, logits_q, chunk).mean()


def js_divergence_from_logits(
    logits_p: torch.Tensor, logits_q: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> float:
    """Mean Jensen-Shannon divergence per token position (nats, in [0, log 2])."""
    return divergence_sums(logits_p, logits_q, chunk).mean().js


def kl_divergence_from_logits(
    logits_p: torch.Tensor, logits_q: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> float:
    """Mean KL(P‖Q) per token position (nats)."""
    return divergence_sums(logits_p, logits_q, chunk).mean().kl


@torch.no_grad()
def divergence(
    original: nn.Module,
    compressed: nn.Module,
    ids: Ids,
    *,
    window: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Divergence:
    """KL(original ‖ compressed), JS and top-1 agreement of next-token distributions on the same ids.

    Documents are cut into non-overlapping windows of `window` tokens (default as for perplexity:
    min(2048, the model's maximum positions)); every position of every window is compared, both
    models seeing exactly the same context. Each model runs on its own device; the original's
    logits move to the compressed model's device for the comparison.
    """
    window = window or default_window(compressed)
    docs = documents(ids, max_tokens)
    windows = [w for i, d in enumerate(docs) for w in sliding_windows(len(d), window, window, i)]
    if not windows:
        raise MoepressError("no tokens to compare; give at least 2 tokens of text (or a larger max_tokens)")
    dev_p, dev_q = model_device(original), model_device(compressed)
    modes = (original.training, compressed.training)
    original.eval()
    compressed.eval()
    sums = DivergenceSums()
    try:
        for batch in progress(batched_windows(windows, batch_size), "divergence"):
            inputs = torch.stack([docs[w.doc][w.start : w.end] for w in batch])
            logits_q = compressed(input_ids=inputs.to(dev_q), use_cache=False).logits
            logits_p = original(input_ids=inputs.to(dev_p), use_cache=False).logits.to(dev_q)
            sums.add(divergence_sums(logits_p, logits_q, chunk))
            del logits_p, logits_q
    finally:
        original.train(modes[0])
        compressed.train(modes[1])
    return sums.mean()
