"""NAEE expert pruning (Lu et al. 2024, "Not All Experts are Equal"): per layer, keep the subset of
experts whose pruned block best reconstructs the original block's output on calibration tokens.

Error of keeping subset S, on the sampled MoE inputs x [K, H] of the layer (`calibrate(...,
keep_moe_inputs=K)`): mean over tokens of ‖block(x) − block(x | S)‖₂², where `block(x | S)` routes
among S only, exactly as the pruned checkpoint will (`MoEBlock.route(active=S)`). Shared experts
cancel in the difference.

Search, per layer, keeping E − n of E experts (n from `experts_to_prune`):
- exhaustive over all C(E, E − n) subsets when that number is at most `exhaustive_limit` (5000 by
  default: any ratio on Mixtral's 8 experts, NAEE's own setting, needs at most 70 subsets; 16
  experts keeping 12 need 1820; subsets are scored in batches, so 5000 take seconds per layer);
- otherwise greedy backward elimination: starting from all experts, n times remove the expert whose
  removal increases the error least (ties: lower id). n·E candidate evaluations instead of C(E, n).

Every candidate reuses one pass of cached work per layer: the router logits and, per token, the Gram
matrix of all experts' outputs (K × E × E float64, e.g. 512 × 64² × 8 B = 16 MiB; see
`ReconstructionError`); a candidate costs only its routing and a small gather. The scores written to
the plan are the error of removing each expert alone. Group-limited routers (DeepSeek-V3 style) are
refused: removing one expert at a time breaks their group structure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from moepress.calibrate.stats import CalibrationStats
from moepress.errors import MoepressError
from moepress.methods.base import Selection, experts_to_prune, register_method
from moepress.models.base import MoEBlock
from moepress.progress import progress

EXHAUSTIVE_LIMIT = 5000
SAMPLED_INPUTS = 512  # token states entering each MoE layer that the reconstruction error is measured on


class ReconstructionError:
    """Mean per-token ‖routed(x | all) − routed(x | S)‖² for many subsets S at once.

    Both outputs are weighted sums of the same cached expert outputs y_e(x_n), so the error of a
    token is cᵀ G_n c, with G_n = [y_e · y_f] the Gram matrix of its expert outputs and c the
    weights of its subset-routed experts followed by minus those of its fully routed ones. Only
    the 2k entries of G_n that a token touches are gathered (float64 arithmetic), so a candidate costs a
    routing and K·(2k)² multiply-adds, whatever the hidden size.
    """

    @torch.no_grad()
    def __init__(self, block: MoEBlock, x: torch.Tensor, token_chunk: int = 64):
        weight = block.experts.weights(0)[1]
        x = x.reshape(-1, block.hidden_size).to(weight.device, weight.dtype)
        self.block = block
        self.num_tokens = x.shape[0]
        self.logits = block.router_logits(x)
        # routes may name a router's extra rows (LongCat-Flash's identity experts, ids E..E+Z-1): their
        # outputs (`block.expert`) join the Gram matrices; rows no expert answers for are never routed to
        ids = list(range(block.num_experts))
        for e in range(block.num_experts, block.num_experts + block.extra_router_rows):
            try:
                block.expert(x[:1], e)
            except (MoepressError, IndexError):
                break
            ids.append(e)
        grams = []
        for start in range(0, self.num_tokens, token_chunk):  # bounds memory to chunk × E × H
            xc = x[start : start + token_chunk]
            y = torch.stack([block.expert(xc, e) for e in ids], dim=1).float()
            # float32 products suffice: where a subset keeps an expert's weight the two equal
            # entries cancel exactly in the float64 quadratic form below
            grams.append((y @ y.transpose(1, 2)).double())
        self.gram = torch.cat(grams)  # [K, E, E]
        full = block.route(x, logits=self.logits)
        self.ref_index, self.ref_weight = full.index, full.weights.double()
        self.tokens = torch.arange(self.num_tokens, device=x.device)

    @torch.no_grad()
    def _route(self, subsets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k indices (original ids) and weights [C, K, k] for equally sized subsets."""
        ids = torch.tensor(subsets, dtype=torch.long, device=self.logits.device)  # [C, n]
        c, n = ids.shape
        if self.block.correction_bias is None:
            # One routing call for all candidates: the router restricted to S sees logits[:, S]
            # (what route(active=S) selects), stacked candidate after candidate; `x` is unused
            # when logits are given.
            stacked = self.logits[:, ids].transpose(0, 1).reshape(c * self.num_tokens, n)
            r = self.block.route(stacked, logits=stacked)
            local = r.index.view(c, self.num_tokens, -1)
            index = ids.gather(1, local.reshape(c, -1)).view_as(local)
            return index, r.weights.double().view(c, self.num_tokens, -1)
        routes = [self.block.route(self.logits, s, logits=self.logits) for s in subsets]
        return torch.stack([r.index for r in routes]), torch.stack([r.weights.double() for r in routes])

    @torch.no_grad()
    def errors(self, subsets: Sequence[Sequence[int]], batch_elements: int = 2**23) -> list[float]:
        """Error of each subset (experts kept, original ids); subsets must all have the same size."""
        out: list[float] = []
        k2 = 2 * self.ref_index.shape[-1]
        step = max(1, batch_elements // (self.num_tokens * k2 * k2))
        for start in range(0, len(subsets), step):
            chunk = [list(s) for s in subsets[start : start + step]]
            index, weight = self._route(chunk)
            c = index.shape[0]
            idx = torch.cat([index, self.ref_index.expand(c, -1, -1)], dim=-1)  # [C, K, 2k]
            coef = torch.cat([weight, -self.ref_weight.expand(c, -1, -1)], dim=-1)
            g = self.gram[self.tokens[None, :, None, None], idx[..., :, None], idx[..., None, :]]
            err = torch.einsum("cna,cnab,cnb->c", coef, g, coef) / self.num_tokens
            out.extend(err.clamp(min=0).tolist())  # rounding can leave -1e-18 where the error is 0
        return out

    def energy(self) -> float:
        """Mean per-token ‖routed(x)‖², the scale against which the errors read."""
        w = self.ref_weight
        g = self.gram[self.tokens[:, None, None], self.ref_index[:, :, None], self.ref_index[:, None, :]]
        return float(torch.einsum("na,nab,nb->", w, g, w) / self.num_tokens)


def exhaustive(err: ReconstructionError, num_experts: int, keep: int) -> tuple[list[int], float]:
    """The subset of `keep` experts with the least error (ties: first in lexicographic order)."""
    subsets = list(itertools.combinations(range(num_experts), keep))
    errors = err.errors(subsets)
    best = min(range(len(subsets)), key=lambda j: (errors[j], j))
    return list(subsets[best]), errors[best]


def greedy(err: ReconstructionError, num_experts: int, n_prune: int) -> tuple[list[int], float]:
    """Backward elimination: n_prune times, drop the expert whose removal raises the error least
    (ties: lower id). Each step's candidates are scored in one batch."""
    active = list(range(num_experts))
    best_err = 0.0
    for _ in range(n_prune):
        errors = err.errors([[a for a in active if a != e] for e in active])
        best_err, gone = min(zip(errors, active, strict=True))
        active.remove(gone)
    return active, best_err


@register_method("naee", layer_inputs=SAMPLED_INPUTS)
def naee(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks: dict[int, MoEBlock] | None = None,
    moe_inputs: dict[int, torch.Tensor] | None = None,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
) -> Selection:
    """Prune round(ratio × E) experts per layer, keeping the subset that best reconstructs the block."""
    if blocks is None or moe_inputs is None:
        raise MoepressError(
            "naee searches on the model: pass blocks=get_adapter(model).blocks(model) and the sampled MoE "
            "inputs from calibrate(model, ids, keep_moe_inputs=512).moe_inputs"
        )
    if isinstance(exhaustive_limit, bool) or not isinstance(exhaustive_limit, int) or exhaustive_limit < 1:
        raise MoepressError(f"exhaustive_limit must be a positive integer (got {exhaustive_limit!r})")
    pruned, scores, search, errors, energy, tokens = {}, {}, {}, {}, {}, {}
    for i in progress(sorted(stats.layers), "naee: searching expert subsets"):
        s = stats[i]
        if i not in blocks or i not in moe_inputs or moe_inputs[i].numel() == 0:
            raise MoepressError(
                f"naee: no MoE block or sampled inputs for layer {i}; calibrate with keep_moe_inputs > 0 "
                "on the same model"
            )
        block = blocks[i]
        if block.num_experts != s.num_experts:
            raise MoepressError(
                f"naee: layer {i} has {block.num_experts} experts but the statistics {s.num_experts}; "
                "calibrate this model again"
            )
        if block.routing.n_group and block.routing.n_group > 1:
            raise MoepressError(
                f"naee: layer {i} routes within {block.routing.n_group} expert groups, which pruning one "
                "expert at a time breaks; use mone, frequency or reap for this model"
            )
        n = experts_to_prune(s.num_experts, s.top_k, ratio)
        keep = s.num_experts - n
        err = ReconstructionError(block, moe_inputs[i])
        every = list(range(s.num_experts))
        scores[i] = err.errors([[a for a in every if a != e] for e in every])
        if math.comb(s.num_experts, keep) <= exhaustive_limit:
            kept, errors[i] = exhaustive(err, s.num_experts, keep)
            search[i] = "exhaustive"
        else:
            kept, errors[i] = greedy(err, s.num_experts, n)
            search[i] = "greedy"
        pruned[i] = [e for e in every if e not in kept]
        energy[i], tokens[i] = err.energy(), err.num_tokens
    return Selection(
        pruned=pruned,
        scores=scores,
        score_name="reconstruction error (mean per-token ‖Δ‖²) when only this expert is removed; "
        "lowest goes first only in the greedy search",
        metadata={
            "search": {str(i): v for i, v in search.items()},
            "reconstruction_error": {str(i): v for i, v in errors.items()},
            "routed_output_energy": {str(i): v for i, v in energy.items()},
            "sampled_tokens": {str(i): n for i, n in tokens.items()},
        },
    )
