"""How far a candidate is from the original model: next-token distributions over the vocabulary
(streamed), or — CD-MoE's reference metric — softmax distributions over the hidden dimension.

A search scores hundreds of candidates on the same calibration tokens, so what is fixed is
computed once: the original model's log-probabilities (and probabilities) are kept per chunk of
token positions when they fit in `reference_cache_bytes`, otherwise its final hidden states are
kept and its logits recomputed chunk by chunk. A candidate's final hidden states go through the
final norm and the LM head `chunk_tokens` positions at a time, so [all tokens × vocab] never
exists at once (32k tokens × 102k vocab would be 13 GB in float32).

Metrics (per token position, nats, float32 per token, float64 sums):
- "hidden-js" (CD-MoE's reference, `greedy_search_expert.py` L36-51, `greedy_search_layer.py`): JS
  divergence between softmax over the HIDDEN dimension of the original's and the candidate's hidden
  states, with the reference's 1e-10 added to P, Q and M inside the logs (`hidden_js`); per-token
  mean within each sequence (a calibration document), then mean over sequences. Where it is taken
  is the search's business: the layer search scores the final normed hidden state
  (`FinalHiddenScorer`), the expert search the condensed layer's own output;
- "vocab-js" (alias "js", moepress's variant): Jensen-Shannon divergence of next-token distributions,
  ½ΣP(log P − log M) + ½ΣQ(log Q − log M), M = (P + Q)/2, the same definition as
  `moepress.evaluate.divergence`, written for speed against a cached P (one exp and one log per
  vocabulary entry, in place; about 6× faster than that general function on CPU);
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

Metric = Literal["hidden-js", "vocab-js", "js", "kl", "ppl"]
METRICS: tuple[str, ...] = ("hidden-js", "vocab-js", "js", "kl", "ppl")
NEXT_TOKEN_METRICS: tuple[str, ...] = ("vocab-js", "js", "kl", "ppl")
REFERENCE_EPS = 1e-10  # CD-MoE's calculate_kl_divergence adds it to both distributions


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise MoepressError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


class HiddenReference:
    """The original's softmax over the hidden dimension, kept so each candidate costs one softmax.

    `js(candidate)` is CD-MoE's reference JS (`greedy_search_expert.py` L20-51): p = softmax(o),
    q = softmax(c), m = (p + q)/2, JS = ½·KL(p‖m) + ½·KL(q‖m) with KL(a‖b) = Σ (a + ε)(log(a + ε) −
    log(b + ε)), ε = 1e-10, float32; one value a token (the reference's `batchmean` is their mean
    over one document's tokens). Rearranged per element, with m + ε = ½((p + ε) + (q + ε)):
    JS = Σ [½(p+ε)log(p+ε) + ½(q+ε)log(q+ε) − (m+ε)log(m+ε)]; the original's term is kept, so a
    candidate costs one exp and two logs per element (the search's hot loop on CPU). Summing per
    element first keeps float32 precise where p ≈ q (summed separately, the three sums of about
    log H would cancel to a small JS and lose most of its digits).
    """

    def __init__(self, original: torch.Tensor):
        self.p_eps = torch.softmax(original.float(), dim=-1).add_(REFERENCE_EPS)
        self.half_p_log_p = self.p_eps.log().mul_(self.p_eps).mul_(0.5)

    @torch.no_grad()
    def js(self, candidate: torch.Tensor) -> torch.Tensor:
        q_eps = torch.softmax(candidate.float(), dim=-1).add_(REFERENCE_EPS)
        m_eps = (q_eps + self.p_eps).mul_(0.5)
        terms = q_eps.log().mul_(q_eps).mul_(0.5).add_(self.half_p_log_p)
        terms.sub_(m_eps.log().mul_(m_eps))
        return terms.sum(-1)


@torch.no_grad()
def hidden_js(original: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per-token JS over the hidden dimension (see `HiddenReference`), shape original.shape[:-1]."""
    return HiddenReference(original).js(candidate)


class FinalHiddenScorer:
    """Hidden-dimension JS at the final normed hidden state (CD-MoE's layer search), per-sequence means.

    Same interface as `NextTokenScorer`: `batch_sum` of per-sequence mean JS, `value` = mean over
    sequences. The original's normed final states are kept (hidden size × tokens; small).
    """

    def __init__(self, norm: nn.Module, reference_final: list[torch.Tensor]):
        self.norm = norm
        with torch.no_grad():
            self._reference = [HiddenReference(norm(h)) for h in reference_final]
        self.sequences = sum(h.shape[0] for h in reference_final)

    @torch.no_grad()
    def batch_sum(self, batch: int, final_hidden: torch.Tensor) -> float:
        return float(self._reference[batch].js(self.norm(final_hidden)).mean(-1).double().sum())

    def value(self, total: float) -> float:
        return total / self.sequences


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
        if metric not in NEXT_TOKEN_METRICS:
            raise MoepressError(f"unknown next-token metric {metric!r}; use one of {', '.join(NEXT_TOKEN_METRICS)}")
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
        """Token chunks [n, ...] of final hidden states [b, T, ...] (several streams keep their axis)."""
        return list(hidden.flatten(0, 1).split(self.chunk))

    def _normed(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """The LM head's input [n, H]; a chunk of several streams [n, S, H] goes through the final
        module(s) as one sequence [1, n, S, H] (they collapse the streams per token)."""
        if hidden_chunk.dim() == 2:
            return self.norm(hidden_chunk)
        return self.norm(hidden_chunk.unsqueeze(0)).squeeze(0)

    def log_probs(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """Float32 next-token log-probabilities of final hidden states [n, H] (pre final norm)."""
        return torch.log_softmax(self.head(self._normed(hidden_chunk)).float(), dim=-1)

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
                logits = self.head(self._normed(h)).float()
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
