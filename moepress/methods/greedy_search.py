"""Greedy search over MoE layers to condense (or drop) and over the routed experts a condensed layer
keeps, scored against the original model — re-running only the decoder layers after the one a
candidate changes.

Metrics (`methods.scoring`): with CD-MoE's reference metric ("hidden-js") the expert search scores a
candidate at its own layer's output (`_search_experts_local`: no later layer runs) and the layer
search at the final normed hidden state; with a next-token metric ("vocab-js", "kl", "ppl") both
searches run the rest of the model and score at the LM head, as described below.

Why it is fast (L decoder layers, calibration set of N tokens, layer l is the candidate's):
- One pass of the original model caches, for every MoE layer l and calibration batch, the MLP input
  x_l and the residual stream after attention h_mid_l (so the layer's output is h_mid_l + mlp(x_l)).
  It runs each MoE MLP through a recorder that returns zeros, so h_mid_l is exactly what the layer
  adds the MLP output to; a one-batch check per MoE layer confirms the layer is that residual form.
- A layer that is not of that form (it transforms the MLP output before the residual: a post-MLP
  norm, hyper-connections mixing several residual streams with per-token weights) is a "whole" layer:
  for it the pass caches the layer's INPUT (the hidden state entering the decoder layer) besides x_l,
  and a candidate's output of that layer is the whole decoder layer run on that input with the MoE
  block's forward replaced by the candidate's MLP (`simulate.forward_replaced`) — what the whole-model
  search computes, one more layer-forward per candidate (x_l still gives the routing statistics and
  the expert outputs: the MLP input does not depend on the MLP's output).
- A candidate that changes only layer l's MLP needs no attention of layer l and no layer before
  it: its layer-l output is h_mid_l + y_candidate(x_l), then layers l+1 .. L-1 run, then the final
  norm and LM head are streamed against the cached original distributions (`scoring.py`).
- Expert steps: a condensed layer's output is shared(x) + Σ_e w_e·expert_e(x), so the candidates of
  one step differ by one term; the kept experts' sum and the shared output are cached, and every
  expert's output on the calibration set is precomputed once per layer when it fits in
  `expert_cache_bytes` (each is reused by every step).
- Candidates are stacked along the batch dimension, `candidates_per_forward` at a time, so one
  decoder-layer call evaluates several; a candidate joins the stack right after the layer it changes.
- After a layer is chosen, the cached (x, h_mid) of the MoE layers after it are refreshed in one pass
  from that layer on, so the next step again starts each candidate at its own layer.

Cost in layer-forwards (one decoder layer over the whole calibration set for one candidate); with
P_l experts considered in layer l, budget k_l = min(k, P_l), c_l = Σ_{s<k_l} (P_l − s) expert
candidates, R_j the candidate layers of layer step j and m_j the layer chosen:
    fast  = L + Σ_l c_l·a_l + Σ_j Σ_{m∈R_j} a_m + Σ_{j<last} a_{m_j},   a_l = L−1−l (+1 for a whole layer)
    naive = L + Σ_l c_l·L       + Σ_j |R_j|·L
(the naive search runs the whole model per candidate, plus once for the reference). Both evaluate
the LM head and the metric the same number of times: 1 + Σ_l c_l + Σ_j |R_j|. With the reference
metric the expert search runs no layer for a residual layer and 1 + c_l for a whole one (its original
output, then one per candidate) instead of Σ_l c_l·a_l.
Not counted: the one-batch structure check per MoE layer and the MLP-only work at a candidate's own
layer (its condensed MLP, k_l + shared experts, or one expert term in an expert step).

The same search with the decoder layers streamed from the checkpoint (models larger than the GPU):
`methods.streamed_search`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from moepress.calibrate.runner import LayerInputs, _to, capture_inputs, hand_on_rule
from moepress.errors import MoepressError
from moepress.methods.document_routing import DocumentRouting, RoutingMass
from moepress.methods.scoring import FinalHiddenScorer, HiddenReference, Metric, NextTokenScorer, check_metric
from moepress.methods.simulate import actions_applied, forward_replaced
from moepress.models import get_adapter
from moepress.models.base import MoEBlock
from moepress.plan import Condense, LayerAction
from moepress.progress import progress

if TYPE_CHECKING:
    from moepress.calibrate.stats import LayerStats


@dataclass
class Candidate:
    """A candidate model that differs from the search's current one from decoder layer `start` on."""

    start: int
    hidden: Callable[[int], torch.Tensor]  # output of layer `start` on calibration batch i [b, T, H]


@dataclass
class ForwardCounts:
    """Work done: decoder layers over the whole calibration set (per candidate), metric evaluations,
    and decoder layers read from the checkpoint (streamed search only)."""

    layer_forwards: int = 0
    metric_evals: int = 0
    layer_loads: int = 0
    document_layer_forwards: int = 0  # one decoder layer over the whole weight documents (`document_routing`)


@dataclass
class ExpertSearch:
    """Greedy expert order of one layer and the metric after adding each (all other layers original)."""

    layer: int
    order: list[int]
    curve: list[float]
    pool: list[int]


@dataclass
class LayerStep:
    """One layer step: the layer chosen, the metric of the cumulative model, every candidate's value."""

    layer: int
    value: float
    candidates: dict[int, float] = field(default_factory=dict)


def naive_layer_forwards(
    num_layers: int, expert_candidates: Mapping[int, int], layer_candidates: list[int]
) -> int:
    """Layer-forwards of the naive search: the whole model per candidate, plus the reference;
    `layer_candidates[j]` is the number of candidate layers of layer step j."""
    return num_layers * (1 + sum(expert_candidates.values()) + sum(layer_candidates))


def fast_layer_forwards(
    num_layers: int,
    expert_candidates: Mapping[int, int],
    layer_steps: list[tuple[list[int], int]],
    local_experts: bool = False,
    whole: Collection[int] = (),
) -> int:
    """Layer-forwards of the cached search; `layer_steps` is [(candidate layers, chosen layer)].
    With `local_experts` (the reference metric) expert candidates are scored at their own layer.
    `whole`: the layers not of the residual form, where a candidate also runs its own layer."""
    after = lambda l: num_layers - 1 - l + (l in whole)  # noqa: E731 - the formula reads best inline
    if local_experts:
        total = num_layers + sum(1 + c for l, c in expert_candidates.items() if l in whole)
    else:
        total = num_layers + sum(c * after(l) for l, c in expert_candidates.items())
    for j, (cands, chosen) in enumerate(layer_steps):
        total += sum(after(m) for m in cands)
        if j < len(layer_steps) - 1:
            total += after(chosen)
    return total


def expert_candidate_count(pool: int, k: int) -> int:
    """c = Σ_{s<min(k,P)} (P − s): candidates of a greedy pick of k among P."""
    return sum(pool - s for s in range(min(k, pool)))


def _stack_states(a: dict | None, b: dict | None) -> dict | None:
    """Two stacks' handed-on states joined along the batch (None where either has none)."""
    if a is None or b is None:
        return None
    return {k: torch.cat([v, b[k]]) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def _repeat_batch(obj, n: int, b: int):
    """Layer kwargs for n candidates stacked along the batch: repeat tensors whose dim 0 is the batch."""
    if n == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == b:
            return obj.repeat(n, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_repeat_batch(o, n, b) for o in obj)
    if isinstance(obj, list):
        return [_repeat_batch(o, n, b) for o in obj]
    if isinstance(obj, dict):
        return {k: _repeat_batch(v, n, b) for k, v in obj.items()}
    return obj


class GreedySearch:
    """Cached layer states of one model on one calibration set, and the greedy searches over them.

    The model must fit on `device` for the search (it is moved there and back by the caller);
    caches live on `storage` (default: `device`).
    """

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        *,
        metric: Metric = "hidden-js",
        batch_size: int = 8,
        device: torch.device | str | None = None,
        storage: torch.device | str | None = None,
        candidates_per_forward: int | None = None,
        reference_cache_bytes: int = 2 * 2**30,
        expert_cache_bytes: int = 2**30,
        documents: list[torch.Tensor] | None = None,
        weight_layers: Collection[int] | None = None,
    ):
        check_metric(metric)
        self.model = model
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers(model)
        self.blocks = self.adapter.blocks(model)
        self.moe_ids = sorted(self.blocks)
        self.num_layers = len(self.layers)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # with weight documents: the MoE layers whose routing statistics are wanted (default: all)
        self.weight_layers = set(self.moe_ids if weight_layers is None else weight_layers)
        inputs = self._prepare(input_ids, batch_size, storage, candidates_per_forward, expert_cache_bytes,
                               self.device, documents)
        final = self._original_pass(inputs.hidden)
        self.metric = metric
        self.norm = self.adapter.final_norm(model)
        if metric == "hidden-js":
            self.scorer = FinalHiddenScorer(self.norm, final)
        else:
            self.scorer = NextTokenScorer(
                self.norm,
                model.get_output_embeddings(),
                metric,
                [ids.to(self.device) for ids in self.input_ids],
                final if metric != "ppl" else None,
                reference_cache_bytes=reference_cache_bytes,
            )
        self.counts.metric_evals += 0 if metric == "ppl" else 1  # the reference distributions

    @property
    def local_expert_metric(self) -> bool:
        """The expert search scores the condensed layer's own output (CD-MoE's reference), not the model's."""
        return self.metric == "hidden-js"

    # ---- running layers ------------------------------------------------------------------------
    def _prepare(self, input_ids: torch.Tensor, batch_size: int, storage: torch.device | str | None,
                 candidates_per_forward: int | None, expert_cache_bytes: int,
                 capture_device: torch.device, documents: list[torch.Tensor] | None = None) -> LayerInputs:
        """The search's batching and caches, and the hidden states and arguments entering layer 0 (the
        embeddings run on `capture_device`). With `documents` (token ids, one tensor a document) the
        routing statistics `stats` come from those documents run whole (`document_routing`), not from
        the search's sequences."""
        self.storage = torch.device(storage) if storage is not None else self.device
        tokens_per_batch = batch_size * input_ids.shape[1]
        if candidates_per_forward is None:
            # CPU matmuls gain nothing from larger batches; accelerators do, up to ~16k tokens a call
            candidates_per_forward = 1 if self.device.type == "cpu" else max(1, 16384 // tokens_per_batch)
        self.candidates_per_forward = max(1, candidates_per_forward)
        self.expert_cache_bytes = expert_cache_bytes
        self.counts = ForwardCounts()
        self.input_ids = list(input_ids.split(batch_size))
        inputs = capture_inputs(self.model, input_ids, batch_size, self.adapter, capture_device,
                                storage=self.storage)
        self.kwargs = inputs.kwargs_on(self.device)  # per layer and batch
        self.stats: dict[int, RoutingMass] = {}  # the fixed weights' routing mass, per MoE layer
        self.documents = (
            DocumentRouting(self.model, self.adapter, documents, capture_device, self.storage) if documents else None
        )
        self.x: dict[int, list[torch.Tensor]] = {}
        self.mid: dict[int, list[torch.Tensor]] = {}
        self.inp: dict[int, list[torch.Tensor]] = {}  # whole layers: the decoder layer's input
        self.whole: set[int] = set()  # MoE layers not of the form h_mid + mlp(x)
        return inputs

    # while set, `_layer` keeps the state each layer hands the next (`Adapter.carried`): the passes that
    # run the model (original, or under the chosen actions) in order; candidates read what they kept
    recording = False

    def _layer(self, j: int, h: torch.Tensor, i: int, n: int = 1) -> torch.Tensor:
        """Layer j on h, batch i's input (n candidates stacked along the batch), with layer j's arguments
        and the state the previous layer handed on."""
        b = h.shape[0] // n
        kw = self.kwargs(j, i)
        handed = self.__dict__.setdefault("handed", {})  # layer -> per batch: the state entering it
        if handed.get(j) is not None and handed[j][i] is not None:
            kw = {**kw, **_to(handed[j][i], self.device)}
        out = self.layers[j](h, **_repeat_batch(kw, n, b), use_cache=False)
        if self.recording and n == 1 and (rule := hand_on_rule(self.adapter)) is not None:
            handed.setdefault(j + 1, [None] * len(self.kwargs))[i] = _to(rule(self.layers[j], kw, h, out), self.storage)
        return out[0] if isinstance(out, tuple) else out

    def _entering(self, j: int, i: int, n: int = 1, b: int = 0) -> dict | None:
        """The state the recording passes kept for layer j on batch i (n stacked copies of batch size b), or
        None. A candidate that changes layer m enters layer m + 1 with the kept state: what a layer hands on
        is computed from its input and the state entering it (ZAYA's router state, an indexer's top-k, block
        states), which the layer's own MLP does not change."""
        handed = self.__dict__.get("handed", {})
        if handed.get(j) is None or handed[j][i] is None:
            return None
        state = _to(handed[j][i], self.device)
        return state if n == 1 else _repeat_batch(state, n, b)

    def _layer_carrying(self, j: int, h: torch.Tensor, i: int, n: int, state: dict) -> tuple[torch.Tensor, dict]:
        """`_layer` for n stacked candidates carrying their own state (`state`, stacked like h): layer j's
        output and the state it hands on, as the model's loop would for each candidate."""
        kw = {**_repeat_batch(self.kwargs(j, i), n, h.shape[0] // n), **state}
        out = self.layers[j](h, **kw, use_cache=False)
        handed = hand_on_rule(self.adapter)(self.layers[j], kw, h, out)
        return (out[0] if isinstance(out, tuple) else out), handed

    def _capture(self, j: int, h: torch.Tensor, action: LayerAction | None, i: int) -> torch.Tensor:
        """Run MoE layer j on batch i's input h, storing its MLP input and residual (a whole layer: its
        input); returns its output."""
        block = self.blocks[j]
        original = block.module.forward
        record: dict[str, torch.Tensor] = {}
        whole = j in self.whole

        def recorder(x: torch.Tensor, *args, **kwargs):
            bound = block.bind(x, *args, **kwargs)  # routes (and hands on) as this call does
            y = original(x, *args, **kwargs) if action is None else bound.forward(x, action)
            y = y[0] if isinstance(y, tuple) else y  # gpt-oss and Llama-4 blocks also return router scores
            record["x"], record["y"], record["call"] = x, y, (args, kwargs)
            return bound.wrap_output(y if whole else torch.zeros_like(y))

        with forward_replaced(block.module, recorder):
            out = self._layer(j, h, i)
        self.x.setdefault(j, [None] * len(self.kwargs))[i] = record["x"].to(self.storage)
        # the block's other call arguments (ZAYA's router state), which its routing may read (`MoEBlock.bind`)
        self.__dict__.setdefault("calls", {}).setdefault(j, [None] * len(self.kwargs))[i] = _to(
            record["call"], self.storage)
        if whole:
            self.inp[j][i] = h.to(self.storage)
            return out
        self.mid.setdefault(j, [None] * len(self.kwargs))[i] = out.to(self.storage)
        if record["y"].numel() != out.numel():  # several residual streams: not the residual form
            return torch.full_like(out, float("nan"))  # fails `_capture_original`'s check
        return out + record["y"].reshape(out.shape)

    def _call(self, j: int, i: int) -> tuple[tuple, dict]:
        """The arguments besides the hidden states that MoE layer j's block got on batch i (cached)."""
        return _to(self.__dict__.get("calls", {}).get(j, {i: ((), {})})[i], self.device)

    def _bound(self, j: int, i: int, x: torch.Tensor) -> MoEBlock:
        """Layer j's block view for its call on batch i's cached input x (see `MoEBlock.bind`)."""
        args, kwargs = self._call(j, i)
        return self.blocks[j].bind(x, *args, **kwargs)

    def _capture_original(self, j: int, h: torch.Tensor, i: int) -> torch.Tensor:
        """`_capture` in the original pass; on the first batch it also tells whether layer j is of the
        residual form (else it becomes a whole layer: its input is cached instead of h_mid)."""
        out = self._capture(j, h, None, i)
        if i == 0:
            direct = self._layer(j, h, i)
            tol = 1e-4 if direct.dtype == torch.float32 else 2e-2
            err = (direct.float() - out.float()).abs().max().item()
            if not err <= tol * max(direct.float().abs().max().item(), 1.0):  # NaN: not comparable
                self.whole.add(j)
                del self.mid[j]
                self.inp[j] = [None] * len(self.kwargs)
                self.inp[j][0] = h.to(self.storage)
                out = direct
        return out

    def _run_whole(self, m: int, i: int, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Output of whole layer m on batch i's cached input, its MoE block computing `mlp(x)`."""
        block = self.blocks[m]

        def forward(x: torch.Tensor, *args, **kwargs):
            return block.bind(x, *args, **kwargs).wrap_output(mlp(x))

        with forward_replaced(block.module, forward):
            return self._layer(m, self.inp[m][i].to(self.device), i)

    def _document_step(self, j: int, wanted: Collection[int]) -> None:
        """With weight documents, run loaded layer j over them (up to the last layer of `wanted`), taking
        the routing statistics of a layer of `wanted` from them."""
        if self.documents is None or j > max(wanted, default=-1):
            return
        self.documents.step(j, self.layers[j], self.blocks[j] if j in wanted else None, self.device)
        self.counts.document_layer_forwards += 1
        if j in wanted:
            self.stats[j] = self.documents.stats.pop(j)

    @torch.no_grad()
    def _original_pass(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """One pass of the original model: caches (x, h_mid) of every MoE layer, routing statistics
        (of the search's sequences, or of the weight documents)."""
        moe = set(self.moe_ids)
        hidden = list(hidden)
        for j in progress(range(self.num_layers), "caching layer states"):
            self.recording = True
            if j in moe and self.documents is None:
                self.stats[j] = RoutingMass.zeros(self.blocks[j].num_experts)
            for i in range(len(self.kwargs)):
                h = hidden[i].to(self.device)
                if j in moe:
                    out = self._capture_original(j, h, i)
                    if self.documents is None:
                        x = self.x[j][i].to(self.device)
                        self.stats[j].update(self._bound(j, i, x), x)
                else:
                    out = self._layer(j, h, i)
                hidden[i] = out.to(self.storage)
            self.counts.layer_forwards += 1
            self._document_step(j, self.weight_layers)
        self.recording = False
        if self.documents is not None:
            self.documents.close()
        return hidden

    # ---- scoring candidates --------------------------------------------------------------------
    @torch.no_grad()
    def score(self, candidates: list[Candidate], context: Mapping[int, LayerAction]) -> list[float]:
        """The metric of each candidate; layers after a candidate's own run under `context`."""
        order = sorted(range(len(candidates)), key=lambda c: candidates[c].start)
        values = [0.0] * len(candidates)
        carries = hand_on_rule(self.adapter) is not None  # layers hand state on: each candidate carries its own
        with actions_applied(self.blocks, context):
            for g in range(0, len(order), self.candidates_per_forward):
                group = order[g : g + self.candidates_per_forward]
                sums = dict.fromkeys(group, 0.0)
                for i in range(len(self.kwargs)):
                    b = self.input_ids[i].shape[0]
                    stack: torch.Tensor | None = None
                    state: dict | None = None
                    members: list[int] = []
                    for j in range(candidates[group[0]].start, self.num_layers):
                        joining = [c for c in group if candidates[c].start == j]
                        if joining:
                            new = [candidates[c].hidden(i).to(self.device) for c in joining]
                            if carries and j + 1 < self.num_layers:
                                entering = self._entering(j + 1, i, len(joining), b)
                                state = _stack_states(state, entering) if members else entering
                            stack = torch.cat(new if stack is None else [stack, *new])
                            members += joining
                        if j + 1 < self.num_layers and state is not None:
                            stack, state = self._layer_carrying(j + 1, stack, i, len(members), state)
                        elif j + 1 < self.num_layers:
                            stack = self._layer(j + 1, stack, i, len(members))
                    for pos, c in enumerate(members):
                        sums[c] += self.scorer.batch_sum(i, stack[pos * b : (pos + 1) * b])
                for c in group:
                    values[c] = self.scorer.value(sums[c])
        self.counts.layer_forwards += sum(self.num_layers - 1 - c.start + (c.start in self.whole) for c in candidates)
        self.counts.metric_evals += len(candidates)
        return values

    # ---- expert search -------------------------------------------------------------------------
    def _expert_outputs(self, layer: int, pool: list[int]) -> Callable[[int, int], torch.Tensor]:
        """expert e's unweighted output on batch i [b·T, H]: precomputed when it fits the budget."""
        block = self.blocks[layer]
        xs = self.x[layer]
        n_tokens = sum(x.shape[0] * x.shape[1] for x in xs)
        itemsize = xs[0].element_size()
        if len(pool) * n_tokens * block.hidden_size * itemsize > self.expert_cache_bytes:
            return lambda e, i: block.expert(xs[i].to(self.device).reshape(-1, block.hidden_size), e)
        cache = {
            e: [block.expert(x.to(self.device).reshape(-1, block.hidden_size), e) for x in xs] for e in pool
        }
        return lambda e, i: cache[e][i]

    @torch.no_grad()
    def search_experts(self, layer: int, k: int, weights: list[float], pool: list[int]) -> ExpertSearch:
        """Greedily add, k times, the expert of `pool` whose addition minimises the metric.

        Context: layer `layer` condensed (shared experts + the experts chosen so far, fixed
        `weights[e]`), every other layer original. Ties go to the lower expert id. With the
        reference metric ("hidden-js") the metric is taken at the condensed layer's own output.
        """
        if self.local_expert_metric:
            return self._search_experts_local(layer, k, weights, pool)
        block = self.blocks[layer]
        hsize = block.hidden_size
        xs, mids = self.x[layer], self.mid.get(layer)
        expert_out = self._expert_outputs(layer, pool)
        shared = [block.shared_out(x.to(self.device).reshape(-1, hsize)) for x in xs]
        routed = [torch.zeros(x.shape[0] * x.shape[1], hsize, dtype=x.dtype, device=self.device) for x in xs]
        order: list[int] = []
        curve: list[float] = []

        # Same operations, in the same order, as MoEBlock.forward under the Condense action, so a
        # candidate's hidden states equal those of the applied-by-hooks model bit for bit.
        def hidden(e: int) -> Callable[[int], torch.Tensor]:
            def mlp(i: int) -> torch.Tensor:
                out = routed[i] + weights[e] * expert_out(e, i)
                return out if shared[i] is None else out + shared[i]

            def at(i: int) -> torch.Tensor:
                if mids is None:  # a whole layer: run it with this MLP output
                    return self._run_whole(layer, i, lambda x: mlp(i).reshape(x.shape))
                return mids[i].to(self.device) + mlp(i).reshape(mids[i].shape)

            return at

        for _ in range(min(k, len(pool))):
            remaining = [e for e in pool if e not in order]
            values = self.score([Candidate(layer, hidden(e)) for e in remaining], {})
            best = min(range(len(values)), key=lambda c: (values[c], c))
            e = remaining[best]
            order.append(e)
            curve.append(values[best])
            routed = [r + weights[e] * expert_out(e, i) for i, r in enumerate(routed)]
        return ExpertSearch(layer=layer, order=order, curve=curve, pool=list(pool))

    @torch.no_grad()
    def _search_experts_local(self, layer: int, k: int, weights: list[float], pool: list[int]) -> ExpertSearch:
        """CD-MoE's reference expert search (`greedy_search_expert.py` L54-107, L211-261): JS over the
        hidden dimension between the original's and the candidate's output of decoder layer `layer`
        itself (`hidden_states[moe_layer + 2]`; for the last decoder layer that state is after the
        final norm, so the norm is applied there too), per-sequence token means, mean over sequences.
        No later layer runs, so a candidate costs one expert term and one softmax."""
        block = self.blocks[layer]
        hsize = block.hidden_size
        last = layer == self.num_layers - 1
        post = self.norm if last else (lambda h: h)
        expert_out = self._expert_outputs(layer, pool)
        if layer in self.whole:
            return self._search_experts_local_whole(layer, k, weights, pool, post, expert_out)
        refs, base = [], []
        for i, (x, mid) in enumerate(zip(self.x[layer], self.mid[layer], strict=True)):
            x, mid = x.to(self.device), mid.to(self.device)
            args, kwargs = self._call(layer, i)
            y = block.module(x, *args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y  # gpt-oss and Llama-4 blocks also return router scores
            refs.append(HiddenReference(post(mid + y.reshape(mid.shape))))
            shared = block.shared_out(x.reshape(-1, hsize))
            base.append(mid if shared is None else mid + shared.reshape(mid.shape))
        sequences = sum(m.shape[0] for m in base)

        def score(e: int) -> float:
            total = 0.0
            for i, ref in enumerate(refs):
                cand = base[i] + (weights[e] * expert_out(e, i)).reshape(base[i].shape)
                total += float(ref.js(post(cand)).mean(-1).double().sum())
            return total / sequences

        def add(e: int) -> None:
            base[:] = [b + (weights[e] * expert_out(e, i)).reshape(b.shape) for i, b in enumerate(base)]

        order, curve, evaluated = greedy_order(pool, k, score, add)
        self.counts.metric_evals += evaluated
        return ExpertSearch(layer=layer, order=order, curve=curve, pool=list(pool))

    def _search_experts_local_whole(
        self, layer: int, k: int, weights: list[float], pool: list[int], post, expert_out
    ) -> ExpertSearch:
        """`_search_experts_local` on a whole layer: the original output and every candidate's are the
        decoder layer run on its cached input (the candidate's MLP output in the order of
        `MoEBlock.forward` under Condense). A layer output with several streams ([b, T, streams, H]) is
        compared as one vector per token."""
        block = self.blocks[layer]
        hsize = block.hidden_size

        def flat(h: torch.Tensor) -> torch.Tensor:
            h = post(h)
            return h.reshape(h.shape[0], h.shape[1], -1)

        refs, shared, routed = [], [], []
        for i, x in enumerate(self.x[layer]):
            x = x.to(self.device)
            refs.append(HiddenReference(flat(self._layer(layer, self.inp[layer][i].to(self.device), i))))
            shared.append(block.shared_out(x.reshape(-1, hsize)))
            routed.append(torch.zeros(x.numel() // hsize, hsize, dtype=x.dtype, device=self.device))
        self.counts.layer_forwards += 1
        sequences = sum(r.p_eps.shape[0] for r in refs)

        def mlp(i: int, e: int) -> torch.Tensor:
            out = routed[i] + weights[e] * expert_out(e, i)
            return out if shared[i] is None else out + shared[i]

        def score(e: int) -> float:
            total = 0.0
            for i, ref in enumerate(refs):
                cand = self._run_whole(layer, i, lambda x, i=i: mlp(i, e).reshape(x.shape))
                total += float(ref.js(flat(cand)).mean(-1).double().sum())
            return total / sequences

        def add(e: int) -> None:
            routed[:] = [r + weights[e] * expert_out(e, i) for i, r in enumerate(routed)]

        order, curve, evaluated = greedy_order(pool, k, score, add)
        self.counts.layer_forwards += evaluated
        self.counts.metric_evals += evaluated
        return ExpertSearch(layer=layer, order=order, curve=curve, pool=list(pool))

    # ---- layer search --------------------------------------------------------------------------
    def _layer_candidate(self, m: int, action: LayerAction) -> Candidate:
        """Layer m under `action`; its output on batch i (a whole layer runs: see `_run_whole`)."""

        def at(i: int) -> torch.Tensor:
            if m in self.whole:
                return self._run_whole(m, i, lambda x: self._bound(m, i, x).forward(x, action))
            mid, x = self.mid[m][i].to(self.device), self.x[m][i].to(self.device)
            return mid + self._bound(m, i, x).forward(x, action).reshape(mid.shape)

        return Candidate(m, at)

    @torch.no_grad()
    def _advance(self, m: int, context: Mapping[int, LayerAction]) -> None:
        """Refresh the cached (x, h_mid) of the MoE layers after m for the model under `context`."""
        moe = set(self.moe_ids)
        self.recording = True
        for i in range(len(self.kwargs)):
            h = self._layer_candidate(m, context[m]).hidden(i)
            for j in range(m + 1, self.num_layers):
                h = self._capture(j, h, context.get(j), i) if j in moe else self._layer(j, h, i)
        self.recording = False
        self.counts.layer_forwards += self.num_layers - 1 - m + (m in self.whole)

    @torch.no_grad()
    def search_layers(
        self,
        actions: Mapping[int, LayerAction],
        done: Callable[[dict[int, LayerAction]], bool],
    ) -> list[LayerStep]:
        """Greedily add, one at a time, the layer whose action (from `actions`) minimises the metric
        of the cumulative model, until `done(chosen)` or every candidate layer is taken.

        Each step's value is the metric of the model with all layers chosen so far applied. The
        cached layer states are left describing that model. Ties go to the lower layer index.
        """
        chosen: dict[int, LayerAction] = {}
        steps: list[LayerStep] = []
        while not done(chosen) and len(chosen) < len(actions):
            if steps:
                self._advance(steps[-1].layer, chosen)
            remaining = [m for m in sorted(actions) if m not in chosen]
            values = self.score([self._layer_candidate(m, actions[m]) for m in remaining], chosen)
            best = min(range(len(values)), key=lambda c: (values[c], c))
            m = remaining[best]
            chosen[m] = actions[m]
            scores = dict(zip(remaining, values, strict=True))
            steps.append(LayerStep(layer=m, value=values[best], candidates=scores))
        return steps


def condense_weights(stats: RoutingMass | LayerStats, mode: str) -> torch.Tensor:
    """Fixed weight of each routed expert of a condensed layer, from the original model's routing.

    "all" (the paper's): mean over ALL calibration tokens of the post-top-k gate weight the expert
    receives, 0 on tokens not routed to it — so Σ_e w_e·expert_e(x) is the routed output's mean
    weighting, and a rarely chosen expert contributes little. "routed": mean over the tokens routed
    to it only (the weight it gets when it is chosen; larger, ignores how often).
    """
    if mode == "all":
        return stats.mean_weight_all_tokens
    if mode == "routed":
        return stats.mean_weight_routed_tokens
    raise MoepressError(f"unknown weight mode {mode!r}; use 'all' or 'routed'")


def condense_action(experts: list[int], weights: torch.Tensor) -> Condense:
    """Condense with `experts` (in greedy order) at their fixed weights, keeping the shared experts."""
    weights = weights.detach()
    return Condense(experts=list(experts), weights=[float(weights[e]) for e in experts], keep_shared=True)


def greedy_order(
    pool: list[int], k: int, score: Callable[[int], float], add: Callable[[int], None]
) -> tuple[list[int], list[float], int]:
    """Greedy forward selection of up to k of `pool`: each step scores every remaining expert with
    `score` (lower is better; ties to the earlier one), keeps the best and calls `add` on it.
    Returns (order, the chosen scores, how many candidates were scored)."""
    order: list[int] = []
    curve: list[float] = []
    evaluated = 0
    for _ in range(min(k, len(pool))):
        remaining = [e for e in pool if e not in order]
        values = [score(e) for e in remaining]
        evaluated += len(remaining)
        best = min(range(len(values)), key=lambda c: (values[c], c))
        order.append(remaining[best])
        curve.append(values[best])
        add(remaining[best])
    return order, curve, evaluated
