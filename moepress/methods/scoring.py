"""How far a candidate's next-token distributions are from the original model's, streamed.

A search scores hundreds of candidates on the same calibration tokens, so what is fixed is
computed once: the original model's log-probabilities (and probabilities) are kept per chunk of
token positions when they fit in `reference_cache_bytes`, otherwise its final hidden states are
kept and its logits recomputed chunk by chunk. A candidate's final hidden states go through the
final norm and the LM head `chunk_tokens` positions at a time, so [all tokens × vocab] never
exists at once (32k tokens × 102k vocab would be 13 GB in float32).

Metrics (per token position, nats, float32 per token, float64 sums):
- "js": Jensen-Shannon divergence ½ΣP(log P − log M) + ½ΣQ(log Q − log M), M = (P + Q)/2, the same
  definition as `moepress.evaluate.divergence`, written for speed against a cached P (one exp and
  one log per vocabulary entry, in place; about 6× faster than that general function on CPU);
- "kl": KL(P_original ‖ Q_candidate);
- "ppl": the candidate's perplexity on the calibration tokens themselves (exp of the mean NLL of
  each next token; the last position of a sequence has no target). No reference is needed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moepress.errors import MoepressError

Metric = Literal["js", "kl", "ppl"]
METRICS: tuple[str, ...] = ("js", "kl", "ppl")


class NextTokenScorer:
    """Sums a next-token metric over calibration batches for candidate final hidden states."""

    def __init__(
        self,
        norm: nn.Module,
        head: nn.Module,
        metric: Metric,
        input_ids: list[torch.Tensor],
        reference_final: list[torch.Tensor] | None,
        chunk_bytes: int = 64 * 2**20,
        reference_cache_bytes: int = 2 * 2**30,
    ):
        if metric not in METRICS:
            raise MoepressError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        self.norm, self.head, self.metric = norm, head, metric
        self.input_ids = input_ids
        vocab = head.weight.shape[0]
        self.chunk = max(1, chunk_bytes // (4 * vocab))
        self.tokens = sum(
            ids.shape[0] * (ids.shape[1] - 1 if metric == "ppl" else ids.shape[1]) for ids in input_ids
        )
        if self.tokens == 0:
            raise MoepressError("calibration sequences need at least 2 tokens each to score next tokens")
        self._final: list[torch.Tensor] | None = None
        self._cache: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        if metric != "ppl":
            if reference_final is None:
                raise MoepressError(f"metric {metric!r} needs the original model's final hidden states")
            total = sum(h.shape[0] * h.shape[1] for h in reference_final)
            if 2 * 4 * total * vocab <= reference_cache_bytes:
                with torch.no_grad():
                    self._cache = [
                        [self._log_probs_and_probs(c) for c in self._chunks(h)] for h in reference_final
                    ]
            else:
                self._final = reference_final

    # ---- pieces --------------------------------------------------------------------------------
    def _chunks(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return list(flat.split(self.chunk))

    def log_probs(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """Float32 next-token log-probabilities of final hidden states [n, H] (pre final norm)."""
        return torch.log_softmax(self.head(self.norm(hidden_chunk)).float(), dim=-1)

    def _log_probs_and_probs(self, hidden_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = self.log_probs(hidden_chunk)
        return logp, logp.exp()

    def _reference(self, batch: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None:
            return self._cache[batch][chunk]
        return self._log_probs_and_probs(self._chunks(self._final[batch])[chunk])

    # ---- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def batch_sum(self, batch: int, final_hidden: torch.Tensor) -> float:
        """Σ over the token positions of calibration batch `batch` of the per-token metric."""
        total = 0.0
        if self.metric == "ppl":
            ids = self.input_ids[batch].to(final_hidden.device)
            hidden = final_hidden[:, :-1]
            targets = ids[:, 1:].reshape(-1)
            for c, h in enumerate(self._chunks(hidden)):
                logits = self.head(self.norm(h)).float()
                t = targets[c * self.chunk : c * self.chunk + h.shape[0]]
                total += float(F.cross_entropy(logits, t, reduction="sum").double())
            return total
        for c, h in enumerate(self._chunks(final_hidden)):
            logp, p = self._reference(batch, c)
            logq = self.log_probs(h)
            if self.metric == "kl":
                per_token = (p * (logp - logq)).sum(-1)
            else:
                q = logq.exp()
                logm = (p + q).mul_(0.5).log_()  # one log; in place, this is the hot loop of a search
                terms = p * (logp - logm)
                terms.addcmul_(q, logq.sub_(logm))
                per_token = 0.5 * terms.sum(-1)
            total += float(per_token.clamp_min(0).double().sum())
        return total

    def value(self, total: float) -> float:
        """The metric from a sum over all calibration batches: a per-token mean (exp of it for ppl)."""
        mean = total / self.tokens
        return math.exp(mean) if self.metric == "ppl" else mean
