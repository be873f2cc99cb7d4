"""The cached greedy search (`greedy_search.GreedySearch`) with the decoder layers streamed from the
checkpoint's safetensors shards: one decoder layer on the device at a time, so a model larger than
the GPU can be searched. The cached layer states (MLP input x_l and residual h_mid_l of each candidate
layer, or x_l and the layer's input for a layer not of the residual form — see `greedy_search`), the
candidates' hidden states and the reference's final states stay in memory (`storage`).

Schedule. Every piece of work that needs decoder layer j is done while j is loaded, and the work is
arranged in sweeps over the layers in order, so each layer is read once per sweep:
- Sweep 1 (all L layers): the original pass (caching x_l, h_mid_l and the routing mass of every
  candidate layer — with weight documents, that mass comes from running each loaded layer over the
  whole documents too, `document_routing`), and, at each candidate layer l as soon as its states are cached, its expert
  search (the reference metric scores at layer l's own output, so it needs layer l alone) and the
  layer-step-1 candidate "l condensed": its hidden state joins the in-flight candidates, which every
  later layer of the same sweep also runs. At the end the reference's final states are known and the
  step-1 candidates are scored — the original pass, every expert search and the first layer step
  cost one read of the checkpoint.
- Sweep t ≥ 2 (layers from min(m_{t-1}, min R_t) on, m_{t-1} the layer chosen last, R_t the candidate
  layers left): the model with the chosen layers applied is re-run from m_{t-1}, refreshing the
  cached states of the candidate layers after it (the in-memory search's `_advance`), and each
  candidate m ∈ R_t joins at its own layer, right after its state is refreshed.
Layer reads:  L + Σ_{t≥2} (L − min(m_{t−1}, min R_t)); layer forwards (compute) are the in-memory
search's exactly (`fast_layer_forwards`), so `plan.metadata["forward_passes"]` checks the same formula.

Limits: with a next-token metric ("vocab-js", "kl", "ppl") the expert search runs the rest of the model
for each of its k greedy steps — k sweeps per layer — so the streamed search takes only the reference
metric for expert searches (CD-MoE-S and layer-drop have none and take every metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from moepress.calibrate.runner import _to, hand_on_rule
from moepress.methods.greedy_search import GreedySearch, LayerStep, RoutingMass, _stack_states
from moepress.methods.scoring import FinalHiddenScorer, Metric, NextTokenScorer, check_metric
from moepress.methods.simulate import actions_applied
from moepress.plan import LayerAction
from moepress.progress import progress

if TYPE_CHECKING:
    from moepress.calibrate.streaming import Streamer


def _batch_slice(state: dict, start: int, end: int) -> dict:
    """One candidate's rows of a stack's handed-on state."""
    return {k: v[start:end] if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def streamed_layer_loads(num_layers: int, layer_steps: Sequence[tuple[Sequence[int], int]]) -> int:
    """Decoder layers read from the checkpoint by the streamed search; `layer_steps` is
    [(candidate layers, chosen layer)] per layer step (see the module docstring)."""
    loads = num_layers
    for (cands, _), (_, previous) in zip(layer_steps[1:], layer_steps[:-1], strict=True):
        loads += num_layers - min(previous, *cands)
    return loads


class StreamedGreedySearch(GreedySearch):
    """`GreedySearch` over a `Streamer`'s meta-device model: layers are loaded when a sweep reaches them.

    Use: `actions = search.caching_pass(decide, candidates)` (the original pass, `decide(l)` — the
    expert search of layer l, called while layer l is loaded — and the first layer step), then
    `search.search_layers(actions, done)` as in memory.
    """

    @torch.no_grad()
    def __init__(
        self,
        stream: Streamer,
        input_ids: torch.Tensor,
        *,
        metric: Metric = "hidden-js",
        batch_size: int = 8,
        storage: torch.device | str | None = None,
        candidates_per_forward: int | None = None,
        reference_cache_bytes: int = 2 * 2**30,
        expert_cache_bytes: int = 2**30,
        documents: list[torch.Tensor] | None = None,
    ):
        check_metric(metric)
        self.stream = stream
        self.model = stream.model
        self.adapter = stream.adapter
        self.layers = stream.layers
        self.moe_ids = self.adapter.moe_layer_ids(self.model)
        self.blocks = {}  # views of loaded layers only: materialising a layer replaces its parameters
        self.num_layers = len(self.layers)
        self.device = stream.device
        self.reference_cache_bytes = reference_cache_bytes
        self.metric = metric
        # embeddings run where the streamer keeps them (host); only the running layer is on the device
        self.hidden0 = self._prepare(input_ids, batch_size, storage, candidates_per_forward, expert_cache_bytes,
                                     stream.rest_device, documents).hidden
        # the final norm (and the LM head for next-token metrics) join the device for the search
        self._moved = [self.adapter.final_norm(self.model)]
        if metric != "hidden-js":
            self._moved.append(self.model.get_output_embeddings())
        for module in self._moved:
            module.to(self.device)
        self.norm = self._moved[0]
        self.scorer = None
        self._first_step: dict[int, float] = {}
        self._candidates: list[int] = []
        self.sweep_seconds: list[float] = []  # wall time of each sweep (sweep 1 includes the expert searches)

    def close(self) -> None:
        """Give the final norm (and head) back to the streamer's host device; drop the caches."""
        for module in self._moved:
            module.to(self.stream.rest_device)
        self.x.clear()
        self.mid.clear()
        self.inp.clear()
        self.scorer = None

    # ---- layers on and off the device ----------------------------------------------------------
    def _load(self, j: int) -> None:
        layer = self.stream.load_layer(j)
        if j in self.moe_ids:
            self.blocks[j] = self.adapter.block(j, layer)
        self.counts.layer_loads += 1

    def _release(self, j: int) -> None:
        self.blocks.pop(j, None)
        self.stream.release_layer(j)

    def _run_inflight(self, j: int, inflight: dict[int, list[torch.Tensor]], action: LayerAction | None) -> None:
        """Run decoder layer j over every in-flight candidate, `candidates_per_forward` stacked a call."""
        if not inflight:
            return
        order = sorted(inflight)
        context = {} if action is None else {j: action}
        # per candidate and batch, the state its layers hand on (families whose layers hand some on): a
        # candidate enters the layer after its own with the kept state (see `GreedySearch._entering`)
        carried = self.__dict__.setdefault("carried", {})
        with actions_applied(self.blocks, context):
            for g in range(0, len(order), self.candidates_per_forward):
                group = order[g : g + self.candidates_per_forward]
                for i in range(len(self.kwargs)):
                    b = self.input_ids[i].shape[0]
                    stack = torch.cat([inflight[c][i].to(self.device) for c in group])
                    states = [carried.setdefault(c, {}).get(i) or self._entering(j, i) for c in group]
                    if hand_on_rule(self.adapter) is None or any(st is None for st in states):
                        out = self._layer(j, stack, i, len(group))
                    else:
                        state = states[0]
                        for st in states[1:]:
                            state = _stack_states(state, _to(st, self.device))
                        out, handed = self._layer_carrying(j, stack, i, len(group), _to(state, self.device))
                        for pos, c in enumerate(group):
                            carried[c][i] = _to(_batch_slice(handed, pos * b, (pos + 1) * b), self.storage)
                    for pos, c in enumerate(group):
                        inflight[c][i] = out[pos * b : (pos + 1) * b].to(self.storage)
        self.counts.layer_forwards += len(order)

    def _score_inflight(self, inflight: dict[int, list[torch.Tensor]]) -> dict[int, float]:
        values = {}
        for c in sorted(inflight):
            total = 0.0
            for i, h in enumerate(inflight[c]):
                total += self.scorer.batch_sum(i, h.to(self.device))
            values[c] = self.scorer.value(total)
        self.counts.metric_evals += len(inflight)
        return values

    def _candidate_hidden(self, m: int, action: LayerAction) -> list[torch.Tensor]:
        at = self._layer_candidate(m, action).hidden
        self.counts.layer_forwards += m in self.whole  # a whole layer runs for its candidate
        return [at(i).to(self.storage) for i in range(len(self.kwargs))]

    # ---- sweep 1 -------------------------------------------------------------------------------
    @torch.no_grad()
    def caching_pass(
        self, decide: Callable[[int], LayerAction], candidates: Sequence[int]
    ) -> dict[int, LayerAction]:
        """The original pass, each candidate layer's action (`decide`, while the layer is loaded) and
        the scores of layer step 1, in one read of the checkpoint; returns the actions."""
        start = time.perf_counter()
        self._candidates = sorted(set(candidates))
        wanted = set(self._candidates)
        actions: dict[int, LayerAction] = {}
        hidden = list(self.hidden0)
        inflight: dict[int, list[torch.Tensor]] = {}
        self.__dict__["carried"] = {}  # the in-flight candidates' handed-on states, per sweep
        for j in progress(range(self.num_layers), "caching layer states, searching experts"):
            self._load(j)
            try:
                self._run_inflight(j, inflight, None)
                self.recording = True  # the original model, in order: keep the state layers hand on
                for i in range(len(self.kwargs)):
                    h = hidden[i].to(self.device)
                    if j in wanted:
                        if i == 0 and self.documents is None:
                            self.stats[j] = RoutingMass.zeros(self.blocks[j].num_experts)
                        out = self._capture_original(j, h, i)
                        if self.documents is None:
                            x = self.x[j][i].to(self.device)
                            self.stats[j].update(self._bound(j, i, x), x)
                    else:
                        out = self._layer(j, h, i)
                    hidden[i] = out.to(self.storage)
                self.recording = False
                self.counts.layer_forwards += 1
                self._document_step(j, wanted)  # the weight documents, while layer j is loaded
                if j in wanted:
                    actions[j] = decide(j)
                    inflight[j] = self._candidate_hidden(j, actions[j])
            finally:
                self._release(j)
        self.hidden0 = []  # layer-0 inputs are not needed again
        if self.documents is not None:
            self.documents.close()
        self._make_scorer(hidden)
        self._first_step = self._score_inflight(inflight)
        self.sweep_seconds.append(time.perf_counter() - start)
        return actions

    def _make_scorer(self, final: list[torch.Tensor]) -> None:
        if self.metric == "hidden-js":
            self.scorer = FinalHiddenScorer(self.norm, [h.to(self.device) for h in final])
        else:
            self.scorer = NextTokenScorer(
                self.norm,
                self.model.get_output_embeddings(),
                self.metric,
                [ids.to(self.device) for ids in self.input_ids],
                [h.to(self.device) for h in final] if self.metric != "ppl" else None,
                reference_cache_bytes=self.reference_cache_bytes,
            )
        self.counts.metric_evals += 0 if self.metric == "ppl" else 1  # the reference, as in memory

    # ---- sweeps 2, 3, ... ----------------------------------------------------------------------
    @torch.no_grad()
    def _sweep(
        self, chosen: Mapping[int, LayerAction], last: int, remaining: list[int], actions: Mapping[int, LayerAction]
    ) -> dict[int, float]:
        """Scores of `remaining` (each with its action) on top of `chosen`, `last` the layer chosen last;
        refreshes the cached states of the candidate layers after `last` on the way."""
        start = time.perf_counter()
        wanted = set(self._candidates)
        joining = set(remaining)
        current: list[torch.Tensor] = []
        inflight: dict[int, list[torch.Tensor]] = {}
        self.__dict__["carried"] = {}  # the in-flight candidates' handed-on states, per sweep
        for j in range(min(last, *remaining), self.num_layers):
            self._load(j)
            try:
                self._run_inflight(j, inflight, chosen.get(j))
                if j == last:
                    current = self._candidate_hidden(last, chosen[last])
                elif j > last:
                    self.recording = True  # the model under the chosen actions, in order
                    for i in range(len(self.kwargs)):
                        h = current[i].to(self.device)
                        # chosen layers are candidate layers, whose capture applies their action
                        out = self._capture(j, h, chosen.get(j), i) if j in wanted else self._layer(j, h, i)
                        current[i] = out.to(self.storage)
                    self.recording = False
                    self.counts.layer_forwards += 1
                if j in joining:
                    inflight[j] = self._candidate_hidden(j, actions[j])
            finally:
                self._release(j)
        scores = self._score_inflight(inflight)
        self.sweep_seconds.append(time.perf_counter() - start)
        return scores

    @torch.no_grad()
    def search_layers(
        self,
        actions: Mapping[int, LayerAction],
        done: Callable[[dict[int, LayerAction]], bool],
    ) -> list[LayerStep]:
        """`GreedySearch.search_layers`, one sweep a step; step 1's scores come from `caching_pass`."""
        if sorted(actions) != self._candidates:
            raise RuntimeError("search_layers takes the actions caching_pass returned")
        chosen: dict[int, LayerAction] = {}
        steps: list[LayerStep] = []
        while not done(chosen) and len(chosen) < len(actions):
            remaining = [m for m in sorted(actions) if m not in chosen]
            if steps:
                scores = self._sweep(chosen, steps[-1].layer, remaining, actions)
            else:
                scores = self._first_step
            values = [scores[m] for m in remaining]
            best = min(range(len(values)), key=lambda c: (values[c], c))
            m = remaining[best]
            chosen[m] = actions[m]
            steps.append(LayerStep(layer=m, value=values[best], candidates=dict(zip(remaining, values, strict=True))))
        return steps
