"""Layer-by-layer execution over cached hidden states: calibration (and search) one decoder layer at
a time, so only one layer's weights need be on the accelerator.

How: the embeddings run once; a stand-in for decoder layer 0 records the hidden states and the
keyword arguments the model passes its layers (rotary embeddings, causal mask, position ids) and
stops the forward. Then each layer in turn is moved to the compute device, run over every cached
batch, and its outputs become the next layer's inputs. Statistics are collected where the MoE MLP
runs: by default its forward is swapped, for the layer's run, for the adapter's view of the block
(`MoEBlock`) computing every routed expert output once, for the statistics and the block's output
alike (checked on the first batch against the model's own block; a family it does not reproduce,
or whose fused path raises, keeps its own forward). `stats_path="hooked"` instead collects them in a
pre-hook and lets the model's own block run (every expert output computed twice), and
`"per_expert"` is the original one-expert-at-a-time loop, kept as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from moepress.calibrate.stats import CalibrationStats, LayerStats, SortedRoutes, route_experts
from moepress.errors import MoepressError
from moepress.models import get_adapter
from moepress.models.base import Adapter, MoEBlock, RouteResult
from moepress.progress import progress


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for one decoder layer during capture: records the arguments the model passes it and
    hands the hidden states on unchanged (a layer's arguments — masks per attention type, rotary
    tables per type, per-layer embeddings — are computed before the layer loop, not from earlier
    layers' outputs); the last one aborts the forward."""

    def __init__(self, layer: nn.Module, last: bool):
        super().__init__()
        self.layer = layer
        self.last = last
        self.as_tuple = False  # the model's loop unpacks (hidden, state) from its layers
        self.perturb = False  # hand on changed hidden states: which arguments depend on earlier layers
        self.record: tuple[torch.Tensor, dict] | None = None

    def __getattr__(self, name: str):
        # the model may read a layer's attributes while it runs (NemotronH's `block_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # positional arguments after hidden_states (Inkling-2): named by the layer's signature
            import inspect

            bound = inspect.signature(self.layer.forward).bind(hidden_states, *args, **kwargs)
            names = list(bound.arguments)
            kwargs = {**dict(zip(names[1:1 + len(args)], args, strict=True)), **kwargs}
        self.record = (hidden_states, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
        if self.last:
            raise _Stop
        out = hidden_states * 1.5 + 1 if self.perturb else hidden_states
        return (out, None) if self.as_tuple else out


@dataclass
class LayerInputs:
    """Hidden states entering decoder layer `position`, per batch, plus every layer's keyword args.

    `kwargs[b]` are what the model passes decoder layer 0 for batch b; `layer_kwargs[j][b]` those of
    layer j where they differ (sliding vs full attention masks, per-type rotary tables, per-layer
    inputs), sharing tensors between layers that receive the same ones."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    storage: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layer_kwargs: dict[int, list[dict]] = field(default_factory=dict)
    position: int = 0
    # state layer `position - 1` handed on, per batch, and the family's rule that computes it
    # (`Adapter.hand_on`; None for families whose layers hand nothing on)
    state: list[dict] = field(default_factory=list)
    hand_on: Callable | None = None

    def kwargs_for(self, layer: int) -> list[dict]:
        """Per batch, the keyword arguments the model passes decoder layer `layer`."""
        return self.layer_kwargs.get(layer, self.kwargs)

    def kwargs_on(self, device: torch.device | str) -> LayerKwargs:
        """Every layer's arguments moved to `device` once (tensors shared between layers stay shared)."""
        memo: dict[int, object] = {}
        return LayerKwargs(
            [_to(kw, device, memo) for kw in self.kwargs],
            {j: [_to(kw, device, memo) for kw in kws] for j, kws in self.layer_kwargs.items()},
        )


@dataclass
class LayerKwargs:
    """Per layer and batch, the keyword arguments of a decoder layer call (`LayerInputs.kwargs_on`)."""

    first: list[dict]
    differing: dict[int, list[dict]]

    def __call__(self, layer: int, batch: int) -> dict:
        return self.differing.get(layer, self.first)[batch]

    def __len__(self) -> int:
        """The number of batches."""
        return len(self.first)


def _to(obj, device, memo: dict[int, object] | None = None):
    """`obj` with every tensor moved to `device`; with `memo`, a tensor met twice is moved once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept alive: its id stays its own
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _same_arguments(a, b) -> bool:
    """Whether two layer calls' arguments are the same (the same objects, or equal tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_arguments, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_arguments(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality: only identity counts
        return False


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    adapter: Adapter | None = None,
    device: torch.device | str | None = None,
    storage: torch.device | str = "cpu",
) -> LayerInputs:
    """Hidden states entering decoder layer 0 and every layer's keyword arguments, batch by batch
    (one forward through stand-ins for the layers: embeddings and argument preparation only)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    device = torch.device(device) if device is not None else model_device(model)
    recorders = [_Recorder(layer, last=j == len(layers) - 1) for j, layer in enumerate(layers)]
    for j, recorder in enumerate(recorders):
        layers[j] = recorder
    hidden, kwargs = [], []
    per_layer: list[list[dict]] = [[] for _ in layers]  # per layer, per batch (layer 0's where equal)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            for recorder in recorders:
                recorder.record = None
            _forward_through(model, ids, recorders)
            missing = [j for j, r in enumerate(recorders) if r.record is None]
            if missing:
                raise MoepressError(f"{adapter.family}: the model's forward did not reach decoder layer "
                                    f"{missing[0]} when recording layer arguments; this family's layers "
                                    "cannot be run one at a time")
            if not hidden:
                _check_no_hidden_state(adapter, model, ids, recorders)
            h, first = recorders[0].record
            memo: dict[int, object] = {}
            hidden.append(h.to(storage))
            kwargs.append(_to(first, storage, memo))
            for j, recorder in enumerate(recorders):
                kw = recorder.record[1]
                per_layer[j].append(kwargs[-1] if j == 0 or _same_arguments(kw, first) else _to(kw, storage, memo))
    finally:
        for j, recorder in enumerate(recorders):
            layers[j] = recorder.layer
    layer_kwargs = {j: kws for j, kws in enumerate(per_layer)
                    if any(kw is not base for kw, base in zip(kws, kwargs, strict=True))}
    return LayerInputs(hidden=hidden, kwargs=kwargs, storage=torch.device(storage), layer_kwargs=layer_kwargs,
                       hand_on=hand_on_rule(adapter))


def hand_on_rule(adapter: Adapter) -> Callable | None:
    """The family's rule for the state its layers hand on, when they hand any."""
    return adapter.hand_on if adapter.carried or adapter.state_arguments else None


def _check_no_hidden_state(adapter: Adapter, model: nn.Module, ids: torch.Tensor, recorders: list[_Recorder]) -> None:
    """Refuse a family whose layers get arguments computed from earlier layers' outputs that its
    adapter does not hand on: layer-by-layer runs would give them stale values, silently."""
    before = [r.record[1] for r in recorders]
    for r in recorders:
        r.perturb, r.record = True, None
    try:
        _forward_through(model, ids, recorders)
    finally:
        for r in recorders:
            r.perturb = False
    for j, (r, kw) in enumerate(zip(recorders, before, strict=True)):
        moved = [k for k in kw if k not in adapter.state_arguments and not _same_arguments(kw[k], r.record[1].get(k))]
        if moved:
            raise MoepressError(f"{adapter.family}: decoder layer {j}'s argument `{moved[0]}` depends on earlier "
                                "layers' outputs, which layer-by-layer runs cannot give it; this family needs "
                                "its adapter to hand that state on (Adapter.hand_on)")


def _forward_through(model: nn.Module, ids: torch.Tensor, recorders: list[_Recorder]) -> None:
    """One forward through the recorders; a model whose loop unpacks (hidden, state) from each layer
    gets tuples (its failure on a bare tensor says so)."""
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        return
    except (TypeError, ValueError) as err:
        if recorders[0].as_tuple or recorders[0].record is None:
            raise
        first = err
    else:
        return
    for recorder in recorders:
        recorder.as_tuple, recorder.record = True, None
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        return
    except Exception as err:  # noqa: BLE001 - neither convention: name the first failure
        raise MoepressError(f"recording the decoder layers' arguments failed ({first}); this family's "
                            "layers cannot be run one at a time") from err


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device | str,
    replace: bool = True,
    index: int | None = None,
) -> list[torch.Tensor]:
    """Run decoder layer `index` (default: the one the cached states enter, `inputs.position`) over all
    cached batches on `device`; returns the outputs, and with `replace` stores them as the next
    layer's inputs."""
    index = inputs.position if index is None else index
    state = inputs.state if inputs.hand_on is not None and index == inputs.position else []
    outs, handed = [], []
    for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs_for(index), strict=True)):
        if state:
            kw = {**kw, **state[i]}
        host_input = h
        h, kw = h.to(device, non_blocking=h.is_pinned()), _to(kw, device)
        out = layer(h, **kw, use_cache=False)
        if inputs.hand_on is not None:
            handed.append(_to(inputs.hand_on(layer, kw, h, out), inputs.storage))
        out = out[0] if isinstance(out, tuple) else out
        out = _to_storage(out, inputs.storage, host_input if replace else None)
        if replace:
            inputs.hidden[i] = out
        outs.append(out)
    if outs and outs[-1].is_pinned():  # the copies to the host were queued without waiting
        torch.cuda.current_stream(torch.device(device)).synchronize()
    if replace:
        inputs.position = index + 1
        inputs.state = handed
    return outs


def _to_storage(out: torch.Tensor, storage: torch.device, reuse: torch.Tensor | None) -> torch.Tensor:
    """`out` moved to `storage`. From a GPU to the host: into pinned memory without waiting, so the next
    batch computes while this one copies (`reuse`, the batch's host input, is overwritten when it is
    pinned and of the same shape: the GPU read it earlier in the same stream)."""
    if out.device.type != "cuda" or storage.type != "cpu":
        return out.to(storage)
    if reuse is None or not reuse.is_pinned() or reuse.shape != out.shape or reuse.dtype != out.dtype:
        reuse = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    return reuse.copy_(out, non_blocking=True)


StatsPath = Literal["fused", "hooked", "per_expert"]


def _fused_forward(block: MoEBlock, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouteResult, SortedRoutes]:
    """The MoE block's output from one grouped run of its routed experts, with the routing and the
    sorted expert outputs the statistics are made from; touches no statistics. Slots routed to
    extra router rows (ids >= E, e.g. identity experts) count in the output only."""
    x = hidden_states.reshape(-1, block.hidden_size)
    route = block.route(x)
    routes = route_experts(block, x, route)
    out = routes.combine(x.shape[0], x.dtype)
    shared = block.shared_out(hidden_states)
    out = out.view(hidden_states.shape)
    return (out if shared is None else out + shared), route, routes


def forward_collecting(block: MoEBlock, stats: LayerStats, hidden_states: torch.Tensor) -> torch.Tensor:
    """The MoE block's output for `hidden_states`, adding the batch to `stats` on the way: the routed
    experts run once (grouped), their outputs feed both. Replaces the block's forward while its
    layer calibrates; equals the model's own block up to float rounding (bit-equal where the
    family's block is the same op sequence, as for transformers' `grouped_mm` experts path)."""
    out, route, routes = _fused_forward(block, hidden_states)
    stats.add_routes(route, routes)
    return out


def _fused_reproduces(block: MoEBlock, hidden_states: torch.Tensor, tokens: int = 64) -> bool:
    """Whether `forward_collecting` gives what the model's own block gives, on a few tokens.

    A family whose block combines experts otherwise than Σ weight · expert(x) (its MoEBlock
    overrides `routed_out` or `forward`), returns more than a tensor, differs beyond rounding, or
    whose fused path raises, is calibrated with its own forward instead (`stats_path="hooked"`),
    never with a wrong one."""
    if type(block).routed_out is not MoEBlock.routed_out or type(block).forward is not MoEBlock.forward:
        return False
    probe = hidden_states.reshape(-1, block.hidden_size)[:tokens].unsqueeze(0)
    theirs = type(block.module).forward(block.module, probe)
    if not isinstance(theirs, torch.Tensor) or theirs.shape != probe.shape:
        return False
    scratch = LayerStats(block.layer_idx, block.num_experts, block.hidden_size, block.top_k)
    try:
        ours = forward_collecting(block, scratch, probe)
    except Exception:  # noqa: BLE001 - any failure of the fused path means: use the family's own forward
        return False
    if ours.shape != theirs.shape:
        return False
    tol = 1e-4 if probe.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(((ours - theirs).abs().max() <= tol * theirs.abs().max().clamp(min=1e-6)).item())


def _collect(block: MoEBlock, stats: LayerStats, stats_path: StatsPath, seen: list[torch.Tensor] | None):
    """Attach statistics collection to `block.module` the way `stats_path` says; returns the undo."""
    if stats_path == "fused":
        own_forward = block.module.forward
        fused: list[bool] = []  # decided on the first call, from real hidden states

        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            if seen is not None:
                seen.append(hidden_states.reshape(-1, block.hidden_size).to("cpu", copy=True))
            if not fused:
                plain_call = not args and set(kwargs) <= set(block.ignored_call_arguments)
                fused.append(plain_call and _fused_reproduces(block, hidden_states))
            if fused[0]:
                try:
                    out, route, routes = _fused_forward(block, hidden_states)
                except Exception:  # noqa: BLE001 - nothing was added yet: fall back for this batch and on
                    fused[0] = False
                else:
                    stats.add_routes(route, routes)
                    return out
            stats.update(block.bind(hidden_states, *args, **kwargs), hidden_states)  # routed as this call is
            return own_forward(hidden_states, *args, **kwargs)

        block.module.forward = forward  # an instance attribute shadows the class's forward
        return lambda: delattr(block.module, "forward")

    update = stats.update if stats_path == "hooked" else stats.update_per_expert

    def hook(_module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, block.hidden_size)
        update(block.bind(*args, **kwargs), x)
        if seen is not None:
            seen.append(x.to("cpu", copy=True))

    return block.module.register_forward_pre_hook(hook, with_kwargs=True).remove


@dataclass
class CalibrationResult:
    stats: CalibrationStats
    moe_inputs: dict[int, torch.Tensor]  # up to K sampled token hidden states entering each MoE MLP


@torch.no_grad()
def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    keep_moe_inputs: int = 0,
    device: torch.device | str | None = None,
    meta: dict | None = None,
    on_layer: Callable[[int, LayerStats | None, LayerInputs], None] | None = None,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
    seed: int = 0,
    stream=None,
    stats_path: StatsPath = "fused",
) -> CalibrationResult:
    """Per-expert statistics of every MoE layer from one layer-by-layer pass over `input_ids`.

    `keep_moe_inputs` > 0 also keeps that many token hidden states entering each MoE MLP (a seeded
    sample), for methods that reconstruct a layer's output (NAEE). Layers move to `device` one at
    a time and back to where they were; with `stream` (a `streaming.Streamer`) each layer is instead
    read from the checkpoint shards just before it runs and released right after. `stats_path`: see
    the module docstring ("fused" is fastest; the others are kept as references and baselines).
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    home = model_device(model) if stream is None else torch.device("meta")
    device = torch.device(device) if device is not None else (home if stream is None else stream.device)
    # the embeddings run where they are (a host model calibrated on a GPU: on the host; each layer then
    # takes its inputs to the GPU)
    capture_device = home if stream is None else stream.rest_device
    inputs = inputs or capture_inputs(model, input_ids, batch_size, adapter, capture_device)
    inputs.hand_on = hand_on_rule(adapter)  # (inputs resumed from disk carry only the state)
    moe_ids = set(adapter.moe_layer_ids(model))
    stats: dict[int, LayerStats] = {}
    moe_inputs: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    for i in progress(range(start_layer, len(layers)), "calibrating layers"):
        layer = stream.load_layer(i) if stream is not None else layers[i].to(device)
        detach = None
        if i in moe_ids:
            block = adapter.block(i, layer)
            s = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
            seen: list[torch.Tensor] = []
            detach = _collect(block, s, stats_path, seen if keep_moe_inputs else None)
        try:
            run_layer(layer, inputs, device, index=i)
        finally:
            if detach is not None:
                detach()
            if stream is not None:
                stream.release_layer(i)
            else:
                layers[i] = layer.to(home)
        if i in moe_ids:
            stats[i] = s.to_("cpu")
            if keep_moe_inputs:
                allx = torch.cat(seen)
                pick = torch.randperm(allx.shape[0], generator=g)[:keep_moe_inputs].sort().values
                moe_inputs[i] = allx[pick]
        if on_layer is not None:
            on_layer(i, stats.get(i), inputs)
    cal = CalibrationStats(layers=stats, meta=dict(meta or {}))
    cal.meta.setdefault("family", adapter.family)
    cal.meta.setdefault("num_sequences", int(input_ids.shape[0]))
    cal.meta.setdefault("seq_len", int(input_ids.shape[1]))
    return CalibrationResult(stats=cal, moe_inputs=moe_inputs)


@torch.no_grad()
def calibrate_hooked(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> CalibrationStats:
    """Reference: the same statistics from whole-model forwards with hooks (used by tests)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    stats = {i: LayerStats(i, b.num_experts, b.hidden_size, b.top_k) for i, b in blocks.items()}
    handles = [
        b.module.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i, b=b: stats[i].update(b.bind(*args, **kwargs), args[0]),
            with_kwargs=True,
        )
        for i, b in blocks.items()
    ]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size].to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return CalibrationStats(layers={i: s.to_("cpu") for i, s in stats.items()})
