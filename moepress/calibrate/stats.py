"""Per-expert calibration statistics: what every method decides from.

Accumulators are float64 sums and Chan/Welford moments, so batches, layers and ranks can be merged
in any order with the same result (up to float rounding). A batch is gathered once into
expert-contiguous order and every routed expert runs as one grouped GEMM (`ExpertStore.
grouped_forward`); its outputs feed all statistics through segment sums over the sorted rows and
one vectorised Chan merge, and can also give the block's routed output (`SortedRoutes.combine`),
so calibration computes each expert output once.

Only the block's real experts (ids < `block.num_experts`) have statistics. A route slot naming an
id past them (a router's `extra_router_rows`, e.g. LongCat-Flash's zero-computation identity
experts) is not an expert that can be pruned, merged or scored: it adds nothing to `count`,
`weight_sum`, the output moments or the logit sums (whose extra columns are dropped), so the real
experts' frequencies sum to the share of slots they received (below 1 where extras were picked).
Its output still counts in the block's output (`SortedRoutes.combine`). Saved as one safetensors file of tensors
(`stats.safetensors`, keys `layers.{i}.{field}`) plus a JSON summary (`stats.json`); reloadable
without the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moepress.calibrate.segment_moments import segment_moments
from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult

_TENSOR_FIELDS = (
    "count", "weight_sum", "weighted_norm_sum", "logit_sum", "logit_sqsum", "out_mean", "out_m2",
)


@dataclass
class SortedRoutes:
    """One batch's routed (token, slot) pairs in expert-contiguous order, with their expert outputs.

    `order`/`weights`/`outputs` hold the pairs routed to real experts only (ids < E), which the
    statistics read; pairs routed to extra router rows (ids >= E) are kept apart in `extra_*`, for
    the block's output alone."""

    order: torch.Tensor  # [S] flat slot (token·k + slot) of each sorted pair routed to a real expert
    counts: torch.Tensor  # [E] pairs per real expert (int64)
    weights: torch.Tensor  # [S] gate weight of each sorted pair
    outputs: torch.Tensor  # [S, H] unweighted expert output of each sorted pair
    # pairs routed to ids >= E (none for most families): flat slots, gate weights, unweighted outputs
    extra_order: torch.Tensor | None = None
    extra_weights: torch.Tensor | None = None
    extra_outputs: torch.Tensor | None = None

    def combine(self, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Σ_k weight · output per token [N, H]: the block's routed output. Same ops in the same
        order as transformers' `grouped_mm` experts path, so the same kernels give the same bits."""
        order, outputs, weights = self.order, self.outputs, self.weights
        if self.extra_order is not None:
            order = torch.cat([order, self.extra_order])
            outputs = torch.cat([outputs, self.extra_outputs.to(outputs.dtype)])
            weights = torch.cat([weights, self.extra_weights.to(weights.dtype)])
        # back to slot order by a gather through the inverse permutation, before weighting: a scatter
        # (`x[order] = ...`) sorts its indices on the GPU, and permuting the unweighted (bf16) rows
        # moves half the bytes of the float32 products; the products and their sum are the same
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device, dtype=order.dtype)
        per_slot = outputs.index_select(0, inverse) * weights.index_select(0, inverse)[:, None]
        return per_slot.view(num_tokens, -1, outputs.shape[-1]).sum(dim=1).to(dtype)


def route_experts(block: MoEBlock, x: torch.Tensor, route: RouteResult) -> SortedRoutes:
    """Sort the routed pairs by expert (one stable sort), gather their tokens once and run every
    expert on its rows in one grouped call; no host sync on the fused-storage path.

    A block with `extra_router_rows` may route to ids >= E: those pairs sort last, are split off
    (one host sync, for such blocks only) and run through `block.expert` id by id (an identity
    expert costs a copy); they get no statistics (see the module docstring)."""
    top_k = route.index.shape[1]
    expert, order = torch.sort(route.index.reshape(-1), stable=True)
    n = block.num_experts
    weights = route.weights.reshape(-1)[order]
    extra = int(getattr(block, "extra_router_rows", 0) or 0)
    bounds = torch.arange(n + extra + 1, device=expert.device, dtype=expert.dtype)
    counts = torch.searchsorted(expert, bounds).diff()
    if not extra:
        outputs = block.experts.grouped_forward(x[order // top_k], counts)
        return SortedRoutes(order=order, counts=counts, weights=weights, outputs=outputs)
    extra_counts = counts[n:].tolist()
    counts = counts[:n]
    real = expert.shape[0] - sum(extra_counts)
    if expert.numel() and int(expert[-1]) >= n + extra:
        raise MoepressError(f"layer {block.layer_idx}: routed to expert {int(expert[-1])}, past its "
                            f"{n} experts and {extra} extra router rows")
    tokens = order // top_k
    outputs = block.experts.grouped_forward(x[tokens[:real]], counts)
    extra_x = x[tokens[real:]]
    extra_outputs = torch.empty_like(extra_x)
    start = 0
    for i, c in enumerate(extra_counts):
        if c:
            extra_outputs[start : start + c] = block.expert(extra_x[start : start + c], n + i)
        start += c
    return SortedRoutes(order=order[:real], counts=counts, weights=weights[:real], outputs=outputs,
                        extra_order=order[real:], extra_weights=weights[real:], extra_outputs=extra_outputs)


def _segment_sum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive row segments of lengths `counts` ([S, ...] -> [E, ...]); deterministic."""
    return torch.segment_reduce(values, "sum", lengths=counts, axis=0, unsafe=True)


def _two_pass_moments(outputs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment mean and M2 in float64, centred on the batch mean before squaring (two passes):
    no cancellation in Σy² − nȳ²; the float32/64 path, as exact as the per-expert reference."""
    y = outputs.to(torch.float64, copy=True)
    mean = _segment_sum(y, counts) / counts.to(torch.float64).clamp(min=1)[:, None]
    y -= mean.repeat_interleave(counts, dim=0, output_size=y.shape[0])
    return mean, _segment_sum(y.square_(), counts)


@dataclass
class LayerStats:
    """Statistics of one MoE layer's routed experts over the calibration tokens.

    Only the real experts 0..E-1 are counted: slots routed to extra router rows (ids >= E) are not.

    - count[e]: routed token slots that picked e;
    - weight_sum[e]: Σ of the gate weight e received (post top-k, as the family applies it);
      tokens that did not route to e contribute 0, so weight_sum / tokens is CD-MoE's fixed weight;
    - weighted_norm_sum[e]: Σ weight · ‖expert_e(x)‖₂ over routed tokens (REAP);
    - logit_sum / logit_sqsum[e]: Σ and Σ² of router logits over ALL tokens;
    - out_mean[e]: mean UNWEIGHTED output vector of e over its routed tokens (the MoNE novice);
    - out_m2[e]: per-dimension Σ of squared deviations from out_mean (variance = out_m2 / count).
    """

    layer: int
    num_experts: int
    hidden_size: int
    top_k: int
    tokens: int = 0
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    weight_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    weighted_norm_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    logit_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    logit_sqsum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    out_mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    out_m2: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        e, h = self.num_experts, self.hidden_size
        zeros = {"count": (e,), "weight_sum": (e,), "weighted_norm_sum": (e,), "logit_sum": (e,),
                 "logit_sqsum": (e,), "out_mean": (e, h), "out_m2": (e, h)}
        for name, shape in zeros.items():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64))

    # ---- accumulation --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, block: MoEBlock, x: torch.Tensor, route: RouteResult | None = None) -> None:
        """Add the tokens x [N, H] entering `block`'s MoE MLP."""
        x = x.reshape(-1, block.hidden_size)
        route = route or block.route(x)
        self.add_routes(route, route_experts(block, x, route))

    def add_routes(self, route: RouteResult, routes: SortedRoutes) -> None:
        """Add one batch from its routing and its expert outputs in expert order (`route_experts`)."""
        # accumulate where the layer runs: copying every expert output to the host was the
        # bottleneck of GPU calibration (and serialised ranks sharing one host); `to_` moves back
        self.to_(routes.outputs.device)
        self.tokens += route.index.shape[0]
        logits = route.logits[:, : self.num_experts].double()  # extra router rows have no statistics
        self.logit_sum += logits.sum(0)
        self.logit_sqsum += (logits * logits).sum(0)
        counts = routes.counts
        # half-precision outputs are summed in float32 from their exact values (~1e-7 relative per
        # batch; the running totals stay float64); float32/64 outputs in float64, as the reference
        acc = torch.float64 if routes.outputs.dtype in (torch.float32, torch.float64) else torch.float32
        w = routes.weights.to(acc)
        norms = torch.linalg.vector_norm(routes.outputs, dim=-1, dtype=acc)
        self.weight_sum += _segment_sum(w, counts).double()
        self.weighted_norm_sum += _segment_sum(w * norms, counts).double()
        if routes.outputs.shape[0] == 0:
            return
        if acc == torch.float64:
            mean_b, m2_b = _two_pass_moments(routes.outputs, counts)
        else:  # one read of the rows (a Triton kernel on the GPU), shifted: see segment_moments
            mean_b, m2_b = self._shifted_moments(routes.outputs, counts)
        self._merge_moments(counts.double(), mean_b.double(), m2_b.double())

    def _shifted_moments(self, outputs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert batch mean and M2 in float32 from sums shifted by a value near each mean: the
        running mean where the expert was seen before, else its first row in this batch."""
        starts = (torch.cumsum(counts, 0) - counts).clamp(max=outputs.shape[0] - 1)
        seen = (self.count > 0)[:, None]
        shift = torch.where(seen, self.out_mean.to(torch.float32), outputs[starts].to(torch.float32))
        total, squares = segment_moments(outputs, counts, shift)
        n = counts.to(torch.float32).clamp(min=1)[:, None]
        return shift * (counts > 0)[:, None] + total / n, (squares - total * total / n).clamp(min=0)

    @torch.no_grad()
    def update_per_expert(self, block: MoEBlock, x: torch.Tensor, route: RouteResult | None = None) -> None:
        """`update` one expert at a time (a Python loop, one host sync per expert): the reference the
        grouped path is tested against and the throughput benchmark's baseline."""
        x = x.reshape(-1, block.hidden_size)
        route = route or block.route(x)
        self.to_(x.device)
        self.tokens += x.shape[0]
        logits = route.logits[:, : self.num_experts].double()  # extra router rows have no statistics
        self.logit_sum += logits.sum(0)
        self.logit_sqsum += (logits * logits).sum(0)
        for e in route.index.unique().tolist():
            if e >= self.num_experts:
                continue  # an extra router row (e.g. an identity expert): not an expert with statistics
            token_idx, slot = torch.where(route.index == e)
            y = block.expert(x[token_idx], e).double()
            w = route.weights[token_idx, slot].double()
            self.add_expert(e, y, w)

    def to_(self, device: torch.device | str) -> LayerStats:
        """Move the accumulators to `device` in place (no-op when already there); returns self."""
        device = torch.device(device)
        if self.count.device != device:
            for name in _TENSOR_FIELDS:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def add_expert(self, e: int, y: torch.Tensor, w: torch.Tensor) -> None:
        """Merge one batch of expert e's unweighted outputs y [n, H] and gate weights w [n] (Chan)."""
        n = y.shape[0]
        if n == 0:
            return
        mean_b = y.mean(0)
        m2_b = ((y - mean_b) ** 2).sum(0)
        n_a = self.count[e]  # a tensor: no device sync
        total = n_a + n
        delta = mean_b - self.out_mean[e]
        self.out_mean[e] += delta * (n / total)
        self.out_m2[e] += m2_b + delta * delta * (n_a * n / total)
        self.count[e] = total
        self.weight_sum[e] += w.sum()
        self.weighted_norm_sum[e] += (w * y.norm(dim=-1)).sum()

    def merge(self, other: LayerStats) -> None:
        """Fold another shard's statistics of the same layer into this one (parallel-safe)."""
        other.to_(self.count.device)
        self._merge_moments(other.count, other.out_mean, other.out_m2)
        for name in ("weight_sum", "weighted_norm_sum", "logit_sum", "logit_sqsum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.tokens += other.tokens

    def _merge_moments(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan's parallel rule for all experts at once: fold per-expert moments (count n_b, output
        mean, M2) into `count`, `out_mean` and `out_m2`."""
        n_a = self.count
        total = n_a + n_b
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean_b - self.out_mean
        self.out_mean = self.out_mean + delta * (n_b / safe)[:, None]
        self.out_m2 = self.out_m2 + m2_b + delta * delta * (n_a * n_b / safe)[:, None]
        self.count = total

    # ---- derived quantities --------------------------------------------------------------------
    @property
    def frequency(self) -> torch.Tensor:
        """Share of routed token slots that pick each expert (sums to 1 over the layer, less the share
        routed to extra router rows where the block has them)."""
        return self.count / max(self.tokens * self.top_k, 1)

    @property
    def output_variance(self) -> torch.Tensor:
        """Per expert: mean over hidden dimensions of the per-dimension output variance over its
        routed tokens, i.e. trace(Cov)/H. 0 for experts never routed to."""
        n = self.count.clamp(min=1)[:, None]
        return (self.out_m2 / n).mean(-1) * (self.count > 0)

    @property
    def mean_weight_all_tokens(self) -> torch.Tensor:
        """Mean gate weight over ALL tokens (0 where not routed): CD-MoE's default fixed weight."""
        return self.weight_sum / max(self.tokens, 1)

    @property
    def mean_weight_routed_tokens(self) -> torch.Tensor:
        return self.weight_sum / self.count.clamp(min=1)

    @property
    def reap_score(self) -> torch.Tensor:
        """REAP: mean over routed tokens of gate weight × ‖expert output‖₂."""
        return self.weighted_norm_sum / self.count.clamp(min=1)

    @property
    def logit_mean(self) -> torch.Tensor:
        return self.logit_sum / max(self.tokens, 1)

    @property
    def logit_std(self) -> torch.Tensor:
        mean = self.logit_mean
        return (self.logit_sqsum / max(self.tokens, 1) - mean * mean).clamp(min=0).sqrt()


@dataclass
class CalibrationStats:
    """Statistics of every MoE layer plus where they came from."""

    layers: dict[int, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)  # model/data fingerprints, n, seq_len, family

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def merge(self, other: CalibrationStats) -> None:
        for i, s in other.layers.items():
            if i in self.layers:
                self.layers[i].merge(s)
            else:
                self.layers[i] = s

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layers.{i}.{name}": getattr(s, name).contiguous()
            for i, s in self.layers.items()
            for name in _TENSOR_FIELDS
        }
        save_file(tensors, str(out / "stats.safetensors"))
        summary = {
            "meta": self.meta,
            "layers": {
                str(i): {
                    "num_experts": s.num_experts,
                    "hidden_size": s.hidden_size,
                    "top_k": s.top_k,
                    "tokens": s.tokens,
                    "dead_experts": int((s.count == 0).sum()),
                    "max_frequency": float(s.frequency.max()),
                    "min_frequency": float(s.frequency.min()),
                }
                for i, s in sorted(self.layers.items())
            },
        }
        (out / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> CalibrationStats:
        out = Path(out_dir)
        if not (out / "stats.json").is_file() or not (out / "stats.safetensors").is_file():
            raise MoepressError(f"{out} holds no statistics; run `moepress calibrate MODEL -o {out}` first")
        summary = json.loads((out / "stats.json").read_text())
        tensors = load_file(str(out / "stats.safetensors"))
        layers = {}
        for key, info in summary["layers"].items():
            i = int(key)
            layers[i] = LayerStats(
                layer=i,
                num_experts=info["num_experts"],
                hidden_size=info["hidden_size"],
                top_k=info["top_k"],
                tokens=info["tokens"],
                **{name: tensors[f"layers.{i}.{name}"] for name in _TENSOR_FIELDS},
            )
        return cls(layers=layers, meta=summary.get("meta", {}))
