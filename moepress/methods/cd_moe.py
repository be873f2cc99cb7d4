"""CD-MoE (Cao et al. 2024, "Condense, Don't Just Prune"): condense whole MoE layers into small dense
layers — the shared experts plus k routed experts with fixed weights, active for every token — and
choose the experts and the layers greedily by a divergence from the original model on calibration
documents. Also the layer-drop baseline, searched the same way.

Registered search methods (`methods.search_registry`):
- `cd-moe-s`: k = 0, a condensed layer is its shared experts only;
- `cd-moe-sr`: shared + k routed experts (k = `experts`, default the model's top-k, as the paper's
  E(2+6) on DeepSeekMoE-16B);
- `layer-drop`: the layer's whole MLP is removed (residual only).

The defaults are the reference code's (github duterscmy/CD-MoE), step by step:
- Fixed weights (`cd-moe/get_weight/get_weight.py` L162-166, `weight_mode="routed"`): w_e = mean of
  the post-top-k gate weight expert e receives over the tokens ROUTED to it (Σ weight / routed
  count, pooled over all documents' tokens: `get_weight/modeling_deepseek.py` L313-345), as the model
  applies it (renormalised only where its config says so, routed scaling included). A condensed layer
  computes shared(x) + Σ_e w_e·expert_e(x) for every token, w not renormalised over the kept experts
  (root `modeling_deepseek.py` L475-490).
- Weight documents (`weights_from="documents"`): the reference's weight script tokenises each
  calibration document WHOLE (no max length, one document a forward: `get_weight.py` L23-41) while its
  searches see the first 256 tokens; so the routing means — the fixed weights, and what is derived from
  them: which experts are candidates (never routed: weight 0) and the `expert_pool` ranking — are
  taken over the same documents untruncated, capped at the model's context length
  (`max_position_embeddings`; `data.documents`), each run alone (`methods.document_routing`).
  `weights_from="search"` takes them from the search's truncated sequences instead (one pass less).
  Without whole documents (`documents=None`: a plain `input_ids` call, or packed windows) the search
  sequences are all there is; the plan's `hyperparameters["weights_from"]` records which was used.
- Expert search (`greedy_search/greedy_search_expert.py`, `metric="hidden-js"`): per MoE layer,
  only that layer condensed, k greedy steps over every routed expert, each step keeping the
  candidate of least JS divergence between softmax over the HIDDEN dimension of the original's and
  the candidate's output of that decoder layer; per-token mean within a document, then mean over
  documents (`GreedySearch._search_experts_local`).
- Layer search (`greedy_search/greedy_search_layer.py`): greedy (beam 1); at each step every
  not-yet-chosen MoE layer is tried on top of the chosen ones, each with its expert-search order,
  scored by the same hidden-dimension JS at the final normed hidden state (before the LM head).
- Calibration (`greedy_search_expert.py` L60-70): separate documents, BOS first, truncated to 256
  tokens, 100 of them — `moepress.data.documents`, the CLI's default for these methods.

moepress's variants, kept as hyperparameters and measured beside the defaults (`bench/fidelity.py`):
- `metric="vocab-js"` (alias "js"): JS between next-token distributions over the vocabulary at the
  LM head, for both searches — what a user of the compressed model sees, rather than a proxy in
  hidden space; `"kl"` and `"ppl"` are the paper's Figure 5 alternatives. With a next-token metric
  the expert search runs the rest of the model for every candidate (far costlier, see
  `methods.greedy_search`).
- `weight_mode="all"`: w_e = mean over ALL calibration tokens (0 where not routed), so a rarely
  chosen expert weighs little and Σ w_e matches the routed output's average total weight
  (about 10× smaller weights than the reference's at k = 6).
- `experts=N`: fewer routed experts than top-k (smaller condensed layers).
- `expert_pool=P`: only the P experts of largest weight are candidates (quick runs).
Experts never routed to on the calibration data (weight 0) are never candidates. The reference has
no usable path for them: its expert search looks the weight up in `dynamic_weights` and, on a miss,
its fallback branch (`greedy_search/modeling_deepseek.py` L407-415, weight 0.06) first prints
`dynamic_weights[layer]`, a key that never exists (the keys are (layer, expert) pairs, L200-206 of
`greedy_search_expert.py`), so a KeyError is raised again before the fallback is assigned; the MoE
block's `forward` catches it and runs the layer unpruned (L377-400). Such a candidate scores JS 0
(the layer's output is the original's) and is picked first — an artefact, not a choice; moepress
leaves these experts out (keeping one adds bytes and nothing else).

Layer search stopping and output: until `layers` are chosen or the predicted checkpoint is at most
`memory_budget` × the original's bytes. The value after each step goes to `plan.metadata["curve"]`
(the paper's Figure 2 curve), every candidate's value per step to `["candidates"]`. Greedy steps are
sequential, so the plan for n layers is the first n steps of a longer search (`prefix_plan`).

Candidate layers. `candidate_layers=[...]` restricts both searches to those MoE layers (the others
stay original and are never candidates), so a recipe can condense some layers and prune others.

Cost: see `methods.greedy_search` for the cached search and its layer-forward formulas; the counts of
the search that ran and of the naive search (whole model per candidate) are recorded in
`plan.metadata["forward_passes"]`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from moepress.data.text import fingerprint_ids
from moepress.errors import MoepressError
from moepress.io.sizes import predict_size, size_of
from moepress.methods.greedy_search import (
    GreedySearch,
    condense_action,
    condense_weights,
    expert_candidate_count,
    fast_layer_forwards,
    naive_layer_forwards,
)
from moepress.methods.scoring import Metric, check_metric
from moepress.methods.search_registry import dropped, register_search_method
from moepress.methods.streamed_search import StreamedGreedySearch, streamed_layer_loads
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Condense, Drop, LayerAction, model_fingerprint
from moepress.progress import progress

if TYPE_CHECKING:
    from moepress.calibrate.streaming import Streamer

WeightMode = Literal["all", "routed"]
WeightsFrom = Literal["documents", "search"]


def _check_args(
    model: nn.Module, input_ids: torch.Tensor, layers: int | None, memory_budget: float | None,
    experts: int | None, metric: str, weight_mode: str, expert_pool: int | None, batch_size: int,
    candidate_layers: list[int] | None = None, weights_from: str = "documents",
    documents: list[torch.Tensor] | None = None,
) -> None:
    if (layers is None) == (memory_budget is None):
        raise MoepressError("give exactly one of layers=N (layers to condense) or memory_budget=F (e.g. 0.7)")
    moe_ids = get_adapter(model).moe_layer_ids(model)
    n_moe, what = len(moe_ids), "the MoE layers"
    if candidate_layers is not None:
        bad = sorted(set(candidate_layers) - set(moe_ids))
        if not candidate_layers or bad:
            raise MoepressError(
                f"candidate_layers must be MoE layers of the model ({', '.join(map(str, moe_ids))}); "
                f"got {bad or '[]'}"
            )
        n_moe, what = len(set(candidate_layers)), "the candidate layers"
    bad_layers = isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n_moe
    if layers is not None and bad_layers:
        raise MoepressError(f"layers must be an integer from 1 to {n_moe} ({what}); got {layers!r}")
    if memory_budget is not None and not 0 < memory_budget < 1:
        raise MoepressError(
            f"memory_budget is the share of the original bytes to keep, in (0, 1); got {memory_budget!r}"
        )
    if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int) or experts < 0):
        raise MoepressError(f"experts must be a non-negative integer (routed experts kept); got {experts!r}")
    check_metric(metric)
    if weight_mode not in ("all", "routed"):
        raise MoepressError(f"unknown weight mode {weight_mode!r}; use 'all' or 'routed'")
    if weights_from not in ("documents", "search"):
        raise MoepressError(f"unknown weights_from {weights_from!r}; use 'documents' (whole documents) or 'search'")
    if documents is not None and (
        not documents or any(not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() < 1 for d in documents)
    ):
        raise MoepressError("documents must be a non-empty list of 1-D token id tensors, one per document")
    if expert_pool is not None and expert_pool < 1:
        raise MoepressError(f"expert_pool must be at least 1 (or None for every expert); got {expert_pool}")
    if batch_size < 1:
        raise MoepressError(f"batch_size must be positive; got {batch_size}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise MoepressError(
            f"calibration ids must be [sequences, length >= 2]; got shape {tuple(input_ids.shape)}"
        )


def _expert_pool(weights: torch.Tensor, size: int | None) -> list[int]:
    routed = [e for e in range(len(weights)) if weights[e] > 0]
    if size is not None and size < len(routed):
        routed = sorted(routed, key=lambda e: (-float(weights[e]), e))[:size]
    return sorted(routed)


def cd_moe(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    experts: int | None = None,
    layers: int | None = None,
    memory_budget: float | None = None,
    metric: Metric = "hidden-js",
    weight_mode: WeightMode = "routed",
    drop: bool = False,
    expert_pool: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    candidates_per_forward: int | None = None,
    method: str | None = None,
    candidate_layers: list[int] | None = None,
    stream: Streamer | None = None,
    storage: torch.device | str | None = None,
    weights_from: WeightsFrom = "documents",
    documents: list[torch.Tensor] | None = None,
) -> CompressionPlan:
    """Search which MoE layers to condense (or, with `drop`, drop) and return the plan.

    `experts` routed experts are kept per condensed layer (0: shared experts only; None: the
    layer's top-k); only
    `candidate_layers` (default: every MoE layer) may be chosen. The model is moved to `device` for
    the search and back; it is never changed. See the module docstring.

    With `stream` (a `calibrate.streaming.Streamer`; `model` is then its meta-device `stream.model`)
    the decoder layers are read from the checkpoint one at a time onto the streamer's device
    (`methods.streamed_search`) and `device` is not used; the cached states live on `storage`
    (default: the streamer's device). Same plan as in memory.

    `documents`: the calibration documents whole (1-D token ids each, BOS first, capped at the model's
    context length; `TokenBatch.documents`), from which the fixed weights are taken unless
    `weights_from="search"` (see the module docstring).
    """
    _check_args(
        model, input_ids, layers, memory_budget, experts, metric, weight_mode, expert_pool, batch_size,
        candidate_layers, weights_from, documents,
    )
    method = method or ("layer-drop" if drop else "cd-moe-s" if experts == 0 else "cd-moe-sr")
    top_k = {i: b.top_k for i, b in get_adapter(model).blocks(model).items()}
    kept = {i: k if experts is None else experts for i, k in top_k.items()}
    if stream is not None and metric != "hidden-js" and not drop and any(kept[i] for i in kept):
        raise MoepressError(
            f"the streamed search scores expert candidates at their own layer (metric hidden-js, the "
            f"reference); metric {metric!r} would re-read the checkpoint k times per layer — search in "
            "memory (without --stream), or keep no routed experts (cd-moe-s, layer-drop)"
        )
    uses_weights = not drop and any(kept[i] for i in kept)
    weight_docs = documents if uses_weights and weights_from == "documents" and documents is not None else None
    actions: dict[int, LayerAction] = {}
    expert_meta: dict[str, dict] = {}
    expert_candidates: dict[int, int] = {}

    def decide(search: GreedySearch, i: int) -> LayerAction:
        """Layer i's action: its expert search (all other layers original)."""
        if drop:
            return Drop()
        weights = condense_weights(search.stats[i], weight_mode)
        if kept[i] == 0:
            return Condense(experts=[], weights=[], keep_shared=True)
        pool = _expert_pool(weights, expert_pool)
        found = search.search_experts(i, kept[i], [float(w) for w in weights], pool)
        expert_candidates[i] = expert_candidate_count(len(pool), kept[i])
        expert_meta[str(i)] = {"order": found.order, "curve": found.curve, "pool": len(pool)}
        return condense_action(found.order, weights)

    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    search = None
    try:
        candidates = sorted(set(candidate_layers or get_adapter(model).moe_layer_ids(model)))
        if stream is None:
            model.to(device)
            search = GreedySearch(
                model, input_ids, metric=metric, batch_size=batch_size, device=device,
                candidates_per_forward=candidates_per_forward, documents=weight_docs, weight_layers=candidates,
            )
            for i in progress(candidates, "searching experts"):
                actions[i] = decide(search, i)
        else:
            search = StreamedGreedySearch(
                stream, input_ids, metric=metric, batch_size=batch_size, storage=storage,
                candidates_per_forward=candidates_per_forward, documents=weight_docs,
            )
            actions = search.caching_pass(lambda i: decide(search, i), candidates)
        original = size_of(model).bytes
        saving = {
            i: original - predict_size(model, CompressionPlan(method=method, layers={i: a})).bytes
            for i, a in actions.items()
        }
        if memory_budget is not None:
            target = memory_budget * original
            if original - sum(saving.values()) > target:
                lowest = (original - sum(saving.values())) / original
                raise MoepressError(
                    f"memory_budget {memory_budget} is out of reach: with every MoE layer "
                    f"{'dropped' if drop else 'condensed'} the model keeps {lowest:.3f} of its bytes; "
                    "raise the budget" + ("" if drop or experts == 0 else " or keep fewer experts (--experts)")
                )

            def done(chosen: dict) -> bool:
                return original - sum(saving[i] for i in chosen) <= target
        else:

            def done(chosen: dict) -> bool:
                return len(chosen) >= layers

        steps = search.search_layers(actions, done)
        counts = search.counts
        local_experts = search.local_expert_metric
        whole = sorted(search.whole & set(candidates))
        sweeps = getattr(search, "sweep_seconds", None)
    finally:
        if stream is None:
            model.to(home)
        elif search is not None:
            search.close()
        model.train(was_training)
        search = None  # frees the cached states before returning
    seconds = time.perf_counter() - start

    order = [s.layer for s in steps]
    bytes_after, saved = [], 0
    for m in order:
        saved += saving[m]
        bytes_after.append(original - saved)
    num_layers = len(get_adapter(model).layers(model))
    step_candidates = [list(s.candidates) for s in steps]
    naive = naive_layer_forwards(num_layers, expert_candidates, [len(c) for c in step_candidates])
    if metric == "ppl":
        naive -= num_layers  # no reference distributions to compute
    expected = fast_layer_forwards(
        num_layers, expert_candidates, list(zip(step_candidates, order, strict=True)), local_experts, whole
    )
    if counts.layer_forwards != expected:  # the formula documents the search; keep them in step
        raise AssertionError(f"layer-forwards {counts.layer_forwards} != formula {expected}")
    passes = {
        "unit": "one decoder layer over the whole calibration set",
        "search_layer_forwards": counts.layer_forwards,
        "naive_layer_forwards": naive,
        "metric_evals": counts.metric_evals,
        # candidate layers not of the form h_mid + mlp(x): each candidate there runs its whole layer
        **({"whole_layers": whole} if whole else {}),
        # the weight documents' pass: decoder layers run over all of them (not in the formulas above)
        **({"document_layer_forwards": counts.document_layer_forwards} if weight_docs is not None else {}),
    }
    if stream is not None:
        loads = streamed_layer_loads(num_layers, list(zip(step_candidates, order, strict=True)))
        if counts.layer_loads != loads:
            raise AssertionError(f"layer loads {counts.layer_loads} != formula {loads}")
        passes["layer_loads"] = loads  # decoder layers read from the checkpoint
    timing = {"search_seconds": seconds} if sweeps is None else {"search_seconds": seconds, "sweep_seconds": sweeps}
    return CompressionPlan(
        method=method,
        hyperparameters={
            "experts": 0 if drop else (experts if experts is not None else _uniform(kept)),
            "layers": layers,
            "memory_budget": memory_budget,
            "metric": metric,
            "weight_mode": weight_mode,
            "expert_pool": expert_pool,
            "batch_size": batch_size,
            "calibration_sequences": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1]),
            # only when given, so plans of a whole-model search stay as they were
            **({} if candidate_layers is None else {"candidate_layers": sorted(set(candidate_layers))}),
            # where the fixed weights' routing means came from (methods with routed experts only)
            **({"weights_from": "documents" if weight_docs is not None else "search"} if uses_weights else {}),
        },
        model_fingerprint=model_fingerprint(model),
        data_fingerprint=fingerprint_ids(input_ids),
        layers={m: actions[m] for m in order},
        metadata={
            "metric": metric,
            "order": order,
            "curve": [s.value for s in steps],
            "candidates": [{str(m): v for m, v in s.candidates.items()} for s in steps],
            "bytes_original": original,
            "bytes": bytes_after,
            "memory_ratio": [b / original for b in bytes_after],
            "experts": expert_meta,
            "forward_passes": passes,
            **timing,
            "calibration_tokens": int(input_ids.numel()),
            **({} if weight_docs is None else {"weight_documents": _documents_meta(weight_docs)}),
        },
    )


def _documents_meta(documents: list[torch.Tensor]) -> dict:
    """How many weight documents, their tokens and longest, and a fingerprint of their ids and lengths."""
    lengths = [int(d.numel()) for d in documents]
    ids = torch.cat([torch.tensor(lengths), *(d.reshape(-1).cpu() for d in documents)])
    return {"documents": len(documents), "tokens": sum(lengths), "longest": max(lengths),
            "fingerprint": fingerprint_ids(ids)}


def _uniform(per_layer: dict[int, int]) -> int | dict[str, int]:
    values = set(per_layer.values())
    return values.pop() if len(values) == 1 else {str(i): k for i, k in per_layer.items()}


def prefix_plan(plan: CompressionPlan, n: int) -> CompressionPlan:
    """The plan of the first `n` layer steps of a greedy search plan (what a search for n layers gives)."""
    order = plan.metadata.get("order")
    if order is None:
        raise MoepressError(f"plan of method {plan.method!r} records no layer order (not a greedy search)")
    if not 1 <= n <= len(order):
        raise MoepressError(f"the plan has {len(order)} layer steps; ask for 1 to {len(order)}")
    meta = dict(plan.metadata)
    for key in ("order", "curve", "candidates", "bytes", "memory_ratio"):
        meta[key] = meta[key][:n]
    return CompressionPlan(
        method=plan.method,
        hyperparameters={**plan.hyperparameters, "layers": n, "memory_budget": None},
        model_fingerprint=plan.model_fingerprint,
        data_fingerprint=plan.data_fingerprint,
        layers={m: plan.layers[m] for m in order[:n]},
        metadata=meta,
    )


@register_search_method("cd-moe-sr")
def cd_moe_sr(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: int | None = None,
    memory_budget: float | None = None,
    experts: int | None = None,
    metric: Metric = "hidden-js",
    weight_mode: WeightMode = "routed",
    expert_pool: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    candidates_per_forward: int | None = None,
    candidate_layers: list[int] | None = None,
    stream: Streamer | None = None,
    storage: torch.device | str | None = None,
    weights_from: WeightsFrom = "documents",
    documents: list[torch.Tensor] | None = None,
) -> CompressionPlan:
    """CD-MoE-SR: condensed layers keep the shared experts and `experts` greedily chosen routed ones
    (default: as many as the layer's top-k, the paper's setting). Fixed weights from the whole
    `documents` (default `weights_from="documents"`, the reference's), or the search sequences."""
    if experts is not None and experts < 1:
        raise MoepressError("cd-moe-sr keeps at least one routed expert; use cd-moe-s for shared experts")
    return cd_moe(
        model, input_ids, experts=experts, layers=layers, memory_budget=memory_budget, metric=metric,
        weight_mode=weight_mode, expert_pool=expert_pool, batch_size=batch_size, device=device,
        candidates_per_forward=candidates_per_forward, method="cd-moe-sr", candidate_layers=candidate_layers,
        stream=stream, storage=storage, weights_from=weights_from, documents=documents,
    )


@register_search_method("cd-moe-s")
def cd_moe_s(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: int | None = None,
    memory_budget: float | None = None,
    metric: Metric = "hidden-js",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    candidates_per_forward: int | None = None,
    candidate_layers: list[int] | None = None,
    stream: Streamer | None = None,
    storage: torch.device | str | None = None,
) -> CompressionPlan:
    """CD-MoE-S: condensed layers keep only their shared experts (on a family without shared experts
    this equals dropping the MLP)."""
    return cd_moe(
        model, input_ids, experts=0, layers=layers, memory_budget=memory_budget, metric=metric,
        batch_size=batch_size, device=device, candidates_per_forward=candidates_per_forward,
        method="cd-moe-s", candidate_layers=candidate_layers, stream=stream, storage=storage,
    )


@register_search_method("layer-drop", layer_change=dropped)
def layer_drop(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: int | None = None,
    memory_budget: float | None = None,
    metric: Metric = "hidden-js",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    candidates_per_forward: int | None = None,
    candidate_layers: list[int] | None = None,
    stream: Streamer | None = None,
    storage: torch.device | str | None = None,
) -> CompressionPlan:
    """Layer-drop baseline: remove whole MoE MLPs, chosen by the same greedy search as CD-MoE."""
    return cd_moe(
        model, input_ids, experts=0, drop=True, layers=layers, memory_budget=memory_budget, metric=metric,
        batch_size=batch_size, device=device, candidates_per_forward=candidates_per_forward,
        method="layer-drop", candidate_layers=candidate_layers, stream=stream, storage=storage,
    )
