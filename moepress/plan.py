"""CompressionPlan: the hand-off between a method (decides) and surgery (changes).

A plan is plain JSON: readable, diffable, editable by hand and re-applicable to the same model.
The tensors a plan needs live in a sidecar safetensors file next to the JSON (`plan.json` ->
`plan.novices.safetensors`, a name kept from when novice vectors were its only content): novice
vectors (keys `layers.{i}.novices.{e}`) and the neuron permutations of merged experts (int64, keys
`layers.{i}.merges.{representative}.{member}`); the JSON names every one of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from safetensors.torch import load_file, save_file

from moepress.errors import MoepressError
from moepress.models import get_adapter

PLAN_VERSION = 1
FIX_PLAN = "fix the plan file or re-run `moepress plan` on this model"


class Keep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["keep"] = "keep"


class Merge(BaseModel):
    """How one kept expert (the representative, the key in `Prune.merges`) is made from several:
    each of its gate/up/down weights = Σ_j coefficients[j] · members[j]'s, the representative one of
    the members. A member in `aligned` has its intermediate neurons permuted first (the plan's int64
    tensor `layers.{i}.merges.{representative}.{member}`, `perm`: gate[perm], up[perm], down[:, perm],
    which leaves that expert's function unchanged), so that matching neurons are averaged."""

    model_config = ConfigDict(extra="forbid")
    members: list[int]
    coefficients: list[float]
    aligned: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Merge:
        if len(self.members) != len(self.coefficients):
            raise ValueError(f"merge: {len(self.members)} members but {len(self.coefficients)} coefficients")
        if len(set(self.members)) != len(self.members):
            raise ValueError("merge: members has duplicates")
        if not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError("merge: coefficients must be finite")
        if not set(self.aligned) <= set(self.members):
            raise ValueError("merge: aligned names experts that are not members")
        # one order, so that equal merges serialise equally
        pairs = sorted(zip(self.members, self.coefficients, strict=True))
        self.members, self.coefficients = [m for m, _ in pairs], [c for _, c in pairs]
        self.aligned = sorted(set(self.aligned))
        return self


class Prune(BaseModel):
    """Remove routed experts not in `keep_experts` (nor in `novices`) from router and expert tensors.

    Each id in `novices` stays in the router; its expert is replaced by a constant output vector
    (the plan's tensor `layers.{i}.novices.{e}`) scaled by the router weight the token gives it.

    Each key of `merges` is a kept expert whose weights become the merge of its `Merge.members`
    (expert merging: HC-SMoE, M-SMoE, REAM). `router_rows` says what happens to the router:
    - "kept": only the kept experts' rows stay (a merge keeps its representative's row; the other
      members leave the router), so the layer routes over len(keep_experts) rows;
    - "all": every one of the E rows stays and each expert id routes to the expert that holds it
      (`expert_map`: a merge's members to the merged expert, a kept expert to itself), as the
      references compute it: top-k over all E logits, the weights of members of one merge adding up
      on the merged expert. Only the kept experts' weights are stored (E' of them, once).
    """

    model_config = ConfigDict(extra="forbid")
    action: Literal["prune"] = "prune"
    keep_experts: list[int]
    novices: list[int] = Field(default_factory=list)
    merges: dict[int, Merge] = Field(default_factory=dict)
    router_rows: Literal["kept", "all"] = "kept"

    @field_validator("merges", mode="before")
    @classmethod
    def _int_keys(cls, v):
        return {int(k): m for k, m in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _disjoint(self) -> Prune:
        if len(set(self.keep_experts)) != len(self.keep_experts):
            raise ValueError("keep_experts has duplicates")
        if set(self.keep_experts) & set(self.novices):
            raise ValueError("an expert cannot be both kept and a novice")
        self.keep_experts = sorted(self.keep_experts)
        self.novices = sorted(set(self.novices))
        seen: set[int] = set()
        for rep, merge in self.merges.items():
            if rep not in self.keep_experts:
                raise ValueError(f"merge into expert {rep}, which is not in keep_experts")
            if rep not in merge.members:
                raise ValueError(f"merge into expert {rep}: the representative must be one of its members")
            others = set(merge.members) - {rep}
            if others & (set(self.keep_experts) | set(self.novices)):
                raise ValueError(f"merge into expert {rep}: a merged member cannot also be kept or a novice")
            if seen & set(merge.members):
                raise ValueError(f"experts {sorted(seen & set(merge.members))} are members of two merges")
            seen |= set(merge.members)
        self.merges = dict(sorted(self.merges.items()))
        if self.router_rows == "all" and self.novices:
            raise ValueError("router_rows='all' routes every expert id to a kept expert; it takes no novices")
        return self

    def expert_map(self, n_experts: int) -> list[int]:
        """router_rows='all': for each of the layer's `n_experts` expert ids, the index (among
        `keep_experts`, ascending) of the stored expert it routes to. Raises ValueError when an id is
        neither kept nor a member of a merge (it would route nowhere)."""
        slot = {e: s for s, e in enumerate(self.keep_experts)}
        for rep, merge in self.merges.items():
            slot.update(dict.fromkeys(merge.members, slot[rep]))
        missing = [e for e in range(n_experts) if e not in slot]
        if missing:
            raise ValueError(f"experts {missing} are neither kept nor merged, so router_rows='all' routes them nowhere")
        return [slot[e] for e in range(n_experts)]


class Condense(BaseModel):
    """Stop routing: output = shared(x) + Σ_i weights[i]·expert_i(x) for every token (CD-MoE)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["condense"] = "condense"
    experts: list[int] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    keep_shared: bool = True

    @model_validator(mode="after")
    def _lengths(self) -> Condense:
        if len(self.experts) != len(self.weights):
            raise ValueError(f"condense: {len(self.experts)} experts but {len(self.weights)} weights")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("condense: experts has duplicates")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError("condense: weights must be finite")
        return self


class Drop(BaseModel):
    """Remove the layer's MLP entirely (residual only): the layer-drop baseline."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["drop"] = "drop"


LayerAction = Annotated[Keep | Prune | Condense | Drop, Field(discriminator="action")]


class CompressionPlan(BaseModel):
    """Per-layer actions plus where they came from. Layers not listed are kept."""

    model_config = ConfigDict(extra="forbid")
    version: int = PLAN_VERSION
    method: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    layers: dict[int, LayerAction] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)  # e.g. the JS curve of a search
    _tensors: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    @field_validator("layers", mode="before")
    @classmethod
    def _int_keys(cls, v):
        return {int(k): a for k, a in v.items()} if isinstance(v, dict) else v

    # ---- novice vectors ------------------------------------------------------------------------
    @staticmethod
    def novice_key(layer: int, expert: int) -> str:
        return f"layers.{layer}.novices.{expert}"

    def set_novice(self, layer: int, expert: int, vector: torch.Tensor) -> None:
        self._tensors[self.novice_key(layer, expert)] = vector.detach().float().cpu().contiguous()

    def novices(self, layer: int) -> dict[int, torch.Tensor]:
        action = self.layers.get(layer)
        if not isinstance(action, Prune):
            return {}
        missing = [e for e in action.novices if self.novice_key(layer, e) not in self._tensors]
        if missing:
            raise MoepressError(f"plan: layer {layer} names novices {missing} but has no vectors for them")
        return {e: self._tensors[self.novice_key(layer, e)] for e in action.novices}

    # ---- merged experts' neuron permutations ------------------------------------------------------
    @staticmethod
    def alignment_key(layer: int, representative: int, member: int) -> str:
        return f"layers.{layer}.merges.{representative}.{member}"

    def set_alignment(self, layer: int, representative: int, member: int, perm: torch.Tensor) -> None:
        """Member's intermediate-neuron permutation before it is merged into `representative`."""
        self._tensors[self.alignment_key(layer, representative, member)] = perm.detach().long().cpu().contiguous()

    def alignments(self, layer: int) -> dict[tuple[int, int], torch.Tensor]:
        """{(representative, member): permutation} of every aligned member of layer `layer`'s merges."""
        action = self.layers.get(layer)
        if not isinstance(action, Prune):
            return {}
        keys = {(r, m): self.alignment_key(layer, r, m) for r, merge in action.merges.items() for m in merge.aligned}
        missing = sorted(k for k, key in keys.items() if key not in self._tensors)
        if missing:
            raise MoepressError(
                f"plan: layer {layer} aligns merged members {[m for _, m in missing]} but has no permutations for them"
            )
        return {k: self._tensors[key] for k, key in keys.items()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self._tensors

    # ---- helpers -------------------------------------------------------------------------------
    def action(self, layer: int) -> LayerAction:
        return self.layers.get(layer, Keep())

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.layers.values():
            counts[a.action] = counts.get(a.action, 0) + 1
        return counts

    # ---- files ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        side = sidecar_path(path)
        if self._tensors:
            save_file(dict(sorted(self._tensors.items())), str(side))
        elif side.exists():
            side.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise MoepressError(f"plan file {path} does not exist; write one with `moepress plan`")
        try:
            plan = cls.model_validate_json(path.read_text())
        except ValueError as err:  # pydantic.ValidationError and JSON errors
            first = str(err).splitlines()
            raise MoepressError(f"plan file {path} is not a valid plan: {' '.join(first[:3])}") from None
        side = sidecar_path(path)
        if side.exists():
            plan._tensors = load_file(str(side))
        return plan

    # ---- validation against a model -------------------------------------------------------------
    def validate_for(self, model, adapter=None) -> None:
        """Raise MoepressError if the plan cannot apply to `model` (checked before any tensor moves)."""
        adapter = adapter or get_adapter(model)
        fp = self.model_fingerprint
        if fp is not None and fp != model_fingerprint(model):
            raise MoepressError(
                "plan was made for another model (fingerprint mismatch); re-run `moepress plan` on this model"
            )
        n_layers = len(adapter.layers(model))
        moe = set(adapter.moe_layer_ids(model))
        for i, a in self.layers.items():
            if not 0 <= i < n_layers:
                raise MoepressError(
                    f"plan: layer {i} does not exist (model has {n_layers} layers); {FIX_PLAN}"
                )
            if isinstance(a, Keep):
                continue
            if i not in moe and i in (unviewed := adapter.unviewed_moe_layers(model)):
                raise MoepressError(f"plan: layer {i} cannot take `{a.action}`: {unviewed[i]}; {FIX_PLAN}")
            if i not in moe:
                raise MoepressError(
                    f"plan: layer {i} is not an MoE layer; only MoE layers can be {a.action}ed; {FIX_PLAN}"
                )
            block = adapter.block(i, adapter.layers(model)[i])
            ids = getattr(a, "experts", [])
            if isinstance(a, Prune):
                ids = a.keep_experts + a.novices + [m for merge in a.merges.values() for m in merge.members]
            bad = [e for e in ids if not 0 <= e < block.num_experts]
            if bad:
                raise MoepressError(
                    f"plan: layer {i} names experts {bad} out of range 0..{block.num_experts - 1}; {FIX_PLAN}"
                )
            if isinstance(a, Prune) and a.router_rows == "all":
                try:
                    a.expert_map(block.num_experts)
                except ValueError as err:
                    raise MoepressError(f"plan: layer {i}: {err}; {FIX_PLAN}") from None
            if isinstance(a, Prune):
                n_active = len(a.keep_experts) + len(a.novices)
                if n_active < block.top_k:
                    raise MoepressError(
                        f"plan: layer {i} keeps {n_active} experts but routes top-{block.top_k}; keep at least "
                        f"{block.top_k} experts there"
                    )
                for e, v in self.novices(i).items():
                    if v.shape != (block.hidden_size,) or not torch.isfinite(v).all():
                        raise MoepressError(f"plan: novice vector of layer {i} expert {e} is malformed; {FIX_PLAN}")
                inter = block.expert_intermediate
                for (rep, m), perm in self.alignments(i).items():
                    if perm.shape != (inter,) or not torch.equal(perm.sort().values, torch.arange(inter)):
                        raise MoepressError(
                            f"plan: layer {i}'s permutation of expert {m} (merged into {rep}) is not a permutation "
                            f"of its {inter} intermediate neurons; {FIX_PLAN}"
                        )


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.stem + ".novices.safetensors")


def model_fingerprint(model) -> str:
    """Cheap identity of a model: its config and the sums of a few weights (not a full hash)."""
    import hashlib

    cfg = model.config.to_dict()
    # not the storage: dtype, and the quantisation a model read dequantised no longer carries (a streamed one does)
    skip = ("dtype", "torch_dtype", "quantization_config")
    keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in skip}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        h.update(f"{emb.float()[:8].sum().item():.4e}".encode())
    return h.hexdigest()[:16]
