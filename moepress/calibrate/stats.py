"""Per-expert calibration statistics: what every method decides from.

Accumulators are float64 sums and Chan/Welford moments, so batches, layers and ranks can be merged
in any order with the same result (up to float rounding). Saved as one safetensors file of tensors
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

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult

_TENSOR_FIELDS = (
    "count", "weight_sum", "weighted_norm_sum", "logit_sum", "logit_sqsum", "out_mean", "out_m2",
)


@dataclass
class LayerStats:
    """Statistics of one MoE layer's routed experts over the calibration tokens.

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
    def update(self, block: MoEBlock, x: torch.Tensor, route: RouteResult | None = None) -> None:
        """Add the tokens x [N, H] entering `block`'s MoE MLP."""
        x = x.reshape(-1, block.hidden_size)
        route = route or block.route(x)
        # accumulate where the layer runs: copying every expert output to the host was the
        # bottleneck of GPU calibration (and serialised ranks sharing one host); `to_` moves back
        self.to_(x.device)
        self.tokens += x.shape[0]
        logits = route.logits.double()
        self.logit_sum += logits.sum(0)
        self.logit_sqsum += (logits * logits).sum(0)
        for e in route.index.unique().tolist():
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
        n_a, n_b = self.count, other.count
        total = n_a + n_b
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = other.out_mean - self.out_mean
        self.out_mean = self.out_mean + delta * (n_b / safe)[:, None]
        self.out_m2 = self.out_m2 + other.out_m2 + delta * delta * (n_a * n_b / safe)[:, None]
        self.count = total
        for name in ("weight_sum", "weighted_norm_sum", "logit_sum", "logit_sqsum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.tokens += other.tokens

    # ---- derived quantities --------------------------------------------------------------------
    @property
    def frequency(self) -> torch.Tensor:
        """Share of routed token slots that pick each expert (sums to 1 over the layer)."""
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
