"""What the source architecture can express of a plan, asked by both the writer (`surgery.apply`) and
the dense-layer choice (`surgery.dense`): one routed-expert count for every MoE layer, and the
transformers name of the experts' activation. (`surgery.apply` re-exports both.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN

from moepress.errors import MoepressError
from moepress.models import Adapter, get_adapter
from moepress.plan import CompressionPlan, Condense, Drop, Prune

__all__ = ["activation_name", "uniform_expert_count"]


def uniform_expert_count(
    model: nn.Module, plan: CompressionPlan, adapter: Adapter | None = None, dense: set[int] | None = None
) -> int | None:
    """The routed-expert count of every MoE layer when the plan's result is expressible in the
    original architecture (same count everywhere, no novices, no condense/drop but in `dense`: layers
    written as the family's own dense MLP, which leave the MoE layers), else None."""
    adapter = adapter or get_adapter(model)
    if adapter.expert_count_shared:  # the count also sizes other modules: a pruned model keeps it
        return None
    layers = adapter.layers(model)
    counts = set()
    if adapter.unviewed_moe_layers(model):  # layers the view leaves out keep the config's count
        config = model.config.get_text_config()
        for name in adapter.num_experts_key.split("."):
            config = getattr(config, name)
        counts.add(config)
    for i in adapter.moe_layer_ids(model):
        if dense and i in dense:
            continue
        action = plan.action(i)
        if isinstance(action, Condense | Drop) or (isinstance(action, Prune) and action.novices):
            return None
        if isinstance(action, Prune) and action.router_rows == "all":  # E router rows over E' experts
            return None
        if isinstance(action, Prune):
            counts.add(len(action.keep_experts))
        else:
            counts.add(adapter.block(i, layers[i]).num_experts)
    return counts.pop() if len(counts) == 1 else None


def activation_name(act_fn: nn.Module | None, config) -> str:
    """The ACT2FN name of the experts' activation (a condensed MLP is rebuilt from it); the config's
    `hidden_act` when the experts do not name theirs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    configured = getattr(text, "hidden_act", None)
    if act_fn is None or (configured in ACT2CLS and type(ACT2FN[configured]) is type(act_fn)):
        return configured
    for name, cls in ACT2CLS.items():
        if not isinstance(cls, tuple) and type(act_fn) is cls:
            return name
    functions = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid"}
    if act_fn in functions:
        return functions[act_fn]
    raise MoepressError(f"the experts' activation {type(act_fn).__name__} has no transformers name; cannot condense")
