"""Layer-by-layer execution over cached hidden states: calibration (and search) one decoder layer at
a time, so only one layer's weights need be on the accelerator.

How: the embeddings run once; a stand-in for decoder layer 0 records the hidden states and the
keyword arguments the model passes its layers (rotary embeddings, causal mask, position ids) and
stops the forward. Then each layer in turn is moved to the compute device, run over every cached
batch, and its outputs become the next layer's inputs. Statistics are collected by a pre-hook on
the MoE MLP, which sees exactly what the whole-model forward would feed it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moepress.calibrate.stats import CalibrationStats, LayerStats
from moepress.models import get_adapter
from moepress.models.base import Adapter
from moepress.progress import progress


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Records the first decoder layer's inputs, then aborts the forward pass."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.record: tuple[torch.Tensor, dict] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to take keyword arguments after hidden_states")
        self.record = (hidden_states, kwargs)
        raise _Stop


@dataclass
class LayerInputs:
    """Hidden states entering one decoder layer, per batch, plus the layer call's keyword args."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    storage: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


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
    """Hidden states and layer kwargs entering decoder layer 0, computed batch by batch."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    device = torch.device(device) if device is not None else model_device(model)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    hidden, kwargs = [], []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            h, kw = catcher.record
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
            hidden.append(h.to(storage))
            kwargs.append(_to(kw, storage))
    finally:
        layers[0] = catcher.layer
    return LayerInputs(hidden=hidden, kwargs=kwargs, storage=torch.device(storage))


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device | str,
    replace: bool = True,
) -> list[torch.Tensor]:
    """Run one decoder layer over all cached batches on `device`; returns (or stores) the outputs."""
    outs = []
    for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs, strict=True)):
        out = layer(h.to(device), **_to(kw, device), use_cache=False)
        out = out[0] if isinstance(out, tuple) else out
        out = out.to(inputs.storage)
        if replace:
            inputs.hidden[i] = out
        outs.append(out)
    return outs


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
) -> CalibrationResult:
    """Per-expert statistics of every MoE layer from one layer-by-layer pass over `input_ids`.

    `keep_moe_inputs` > 0 also keeps that many token hidden states entering each MoE MLP (a seeded
    sample), for methods that reconstruct a layer's output (NAEE). Layers move to `device` one at
    a time and back to where they were; with `stream` (a `streaming.Streamer`) each layer is instead
    read from the checkpoint shards just before it runs and released right after.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    home = model_device(model) if stream is None else torch.device("meta")
    device = torch.device(device) if device is not None else (home if stream is None else stream.device)
    capture_device = device if stream is None else stream.rest_device
    inputs = inputs or capture_inputs(model, input_ids, batch_size, adapter, capture_device)
    moe_ids = set(adapter.moe_layer_ids(model))
    stats: dict[int, LayerStats] = {}
    moe_inputs: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    for i in progress(range(start_layer, len(layers)), "calibrating layers"):
        layer = stream.load_layer(i) if stream is not None else layers[i].to(device)
        handle = None
        if i in moe_ids:
            block = adapter.block(i, layer)
            s = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
            seen: list[torch.Tensor] = []

            def hook(_module, args, kwargs, block=block, s=s, seen=seen):
                x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, block.hidden_size)
                s.update(block, x)
                if keep_moe_inputs:
                    seen.append(x.to("cpu", copy=True))

            handle = block.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run_layer(layer, inputs, device)
        finally:
            if handle is not None:
                handle.remove()
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
            lambda _m, args, i=i, b=b: stats[i].update(b, args[0].reshape(-1, b.hidden_size))
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
