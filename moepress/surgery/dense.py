"""Condensed and dropped MoE layers as the family's OWN dense layers, where its config can list them.

A family whose config lists dense decoder layers (`Adapter.dense_placement`: Qwen2-/Qwen3-MoE's
`mlp_only_layers`) gets a condensed or dropped MoE layer written as its own dense MLP at that layer,
listed in that field, so that the output stays a plain checkpoint of the source architecture
(`AutoModelForCausalLM.from_pretrained`, vLLM) instead of a `moepress_<family>` one. A layer fits when
nothing per token gates its parts and its rows fit the dense MLP's width:
- `drop`: the dense MLP with zero weights, output exactly 0 (it costs `3·width·hidden` zero
  parameters where a moepress `DroppedMLP` costs none: the manifest says how many bytes);
- `condense`: the condensed MLP's rows (shared experts' rows, then each chosen expert's rows with its
  fixed weight folded into its down_proj columns, as `CondensedMLP`), zero-padded to the dense MLP's
  width: a zero row gives act(0)·0 = 0 in a gated MLP (act(0) = 0 in an ungated one), so the output
  is the same. A layer keeping a per-token-gated shared expert (Qwen2-MoE's sigmoid gate), an output
  bias or norm, a wider condensed MLP, or another activation does not fit.

With `dense_layers="auto"` (the default) the fitting layers are placed so only when that makes the
whole output plain: every condensed or dropped layer fits and the rest is expressible (keeps, and prunes
to one expert count without novices). Otherwise, and with `"never"`, every layer is written as before:
padding is paid only where it buys a plain checkpoint. The plan is the same either way; this only
chooses how its actions are written.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.activations import ACT2FN

from moepress.errors import MoepressError
from moepress.models import Adapter, MoEBlock
from moepress.models.base import DensePlacement
from moepress.plan import CompressionPlan, Condense, Drop, LayerAction, Prune
from moepress.surgery.architecture import activation_name, uniform_expert_count

DENSE_LAYERS = ("auto", "never")


def check_option(dense_layers: str) -> str:
    if dense_layers not in DENSE_LAYERS:
        raise MoepressError(f"dense_layers must be one of {', '.join(DENSE_LAYERS)} (got {dense_layers!r})")
    return dense_layers


def condensed_width(block: MoEBlock, action: Condense) -> int:
    """Intermediate rows of the condensed dense MLP: the kept shared experts' and the chosen experts'."""
    keep_shared = action.keep_shared and block.shared is not None
    return (block.shared_intermediate if keep_shared else 0) + len(action.experts) * block.expert_intermediate


def zero_rows_inert(hidden_act: str, gated: bool) -> bool:
    """Whether a zero intermediate row adds exactly 0: act(0)·0 = 0 (gated), act(0) = 0 (ungated)."""
    zero = torch.zeros(1)
    value = ACT2FN[hidden_act](zero) * zero if gated else ACT2FN[hidden_act](zero)
    return bool(torch.all(value == 0))


def refusal(block: MoEBlock, action: LayerAction, placement: DensePlacement, config) -> str | None:
    """Why layer `block`'s `action` cannot be the family's dense MLP (None: it can)."""
    if isinstance(action, Drop):
        return "its router hands state to the next layer" if block.drop_keeps_router else None
    if not isinstance(action, Condense):
        return "only condensed and dropped layers become dense"
    if block.condense_keeps_router or not block.condenses_to_dense:
        return "its condensed form is not one dense MLP"
    keep_shared = action.keep_shared and block.shared is not None
    if keep_shared and block.shared_gate is not None:
        return "it keeps a shared expert gated per token"
    if getattr(block, "post_norm", None) is not None or (block.output_bias is not None and action.keep_shared):
        return "the block normalises or biases its output"
    gated = block.experts.weights(0)[0] is not None
    if gated != placement.gated:
        return "its experts and the dense MLP differ in gating"
    if activation_name(block.experts.act_fn, config) != placement.hidden_act:
        return "its experts and the dense MLP differ in activation"
    if not zero_rows_inert(placement.hidden_act, gated):
        return f"{placement.hidden_act}(0) is not 0, so padding rows would add to the output"
    width = condensed_width(block, action)
    if width > placement.width:
        return f"its {width} rows exceed the dense MLP's {placement.width}"
    return None


def dense_layer_ids(
    model, plan: CompressionPlan, adapter: Adapter, blocks: dict[int, MoEBlock], dense_layers: str = "auto"
) -> list[int]:
    """The layers to write as the family's dense MLP: every condensed or dropped layer when all fit and
    the result is then plain (`"auto"`), else none."""
    if check_option(dense_layers) == "never":
        return []
    placement = adapter.dense_placement(model.config)
    changed = sorted(i for i, a in plan.layers.items() if isinstance(a, Condense | Drop))
    if placement is None or not changed:
        return []
    config = model.config
    if any(refusal(blocks[i], plan.action(i), placement, config) is not None for i in changed):
        return []
    if any(isinstance(a, Prune) for a in plan.layers.values()):
        if uniform_expert_count(model, plan, adapter, dense=set(changed)) is None:
            return []
    return changed


def describe_dense(
    placement: DensePlacement, ids: list[int], rows: dict[int, int], hidden_size: int, itemsize: int, gated: bool
) -> dict[str, Any]:
    """The structure's `dense` entry: where the dense layers are listed, and what their zero rows cost
    (`rows`: each layer's condensed rows; a dropped layer has none)."""
    zero_rows = sum(placement.width - rows.get(i, 0) for i in ids)
    return {
        "key": placement.key,
        "path": placement.path,
        "width": placement.width,
        "layers": list(ids),
        "zero_bytes": zero_rows * (3 if gated else 2) * hidden_size * itemsize,
    }


def dense_state(block: MoEBlock, action: LayerAction, condensed: dict[str, torch.Tensor], prefix: str, width: int):
    """The dense MLP's tensors (names under the MLP): a condensed layer's rows (`condensed`, keyed
    `{prefix}.gate_proj.weight` etc.) zero-padded to `width`; zeros for a dropped layer."""
    gate, up, _ = block.experts.weights(0)
    hidden = block.hidden_size
    if isinstance(action, Drop):
        zeros = {"up_proj.weight": up.new_zeros(width, hidden), "down_proj.weight": up.new_zeros(hidden, width)}
        if gate is not None:
            zeros["gate_proj.weight"] = up.new_zeros(width, hidden)
        return zeros
    out = {}
    for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        t = condensed.get(f"{prefix}.{name}")
        if t is None:
            continue
        dim = 1 if name.startswith("down") else 0
        pad = width - t.shape[dim]
        shape = (t.shape[0], pad) if dim else (pad, t.shape[1])
        out[name] = torch.cat([t, t.new_zeros(shape)], dim=dim) if pad else t
    return out
