"""Train a condensed MLP with its fixed routing weights outside the down-projection (CD-MoE's
parametrisation), while the module and its checkpoint keep them folded in.

`CondensedMLP` stores `down_proj[:, routed rows of expert e] = w_e * D_e`, which is the same
function as the reference's `w_e * expert_e(x)` but not the same optimisation problem: Adam's step
is about `lr` per parameter whatever the parameter's scale, so training the folded column moves the
expert's effective output by ~`lr` instead of the reference's ~`w_e * lr` (≈15x faster for
w_e ≈ 0.07, and all routed experts move at the same speed regardless of their weight). Inside
`unfolded(...)` the down columns hold `D_e` (folded column / w_e) and a forward pre-hook on
`down_proj` multiplies its input rows by the constant `w_e` (1 for shared rows), so the forward is
unchanged and the optimiser sees the reference's parameters; on exit the columns are multiplied by
`w_e` again, so what is saved is today's checkpoint format. A routed expert with w_e = 0 contributes
nothing in either form and cannot be unfolded (its D_e is gone); its columns stay 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moepress.plan import Condense


def row_scales(module: nn.Module, action: Condense) -> torch.Tensor:
    """The constant each intermediate row of `module` (a CondensedMLP built from `action`) is
    scaled by: 1 for the shared rows, the expert's fixed weight for its routed rows (float32)."""
    rows = module.down_proj.in_features
    shared = module.shared_rows
    routed = rows - shared
    k = len(action.experts)
    if (k == 0 and routed) or (k and routed % k):
        raise ValueError(f"condensed MLP has {routed} routed rows, not a multiple of the plan's {k} experts")
    per_expert = routed // k if k else 0
    weights = torch.tensor(action.weights, dtype=torch.float32)
    return torch.cat([torch.ones(shared), weights.repeat_interleave(per_expert)])


def _scale_input(scale: torch.Tensor):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        h = args[0]
        return ((h.float() * scale).to(h.dtype), *args[1:])

    return hook


@contextmanager
def unfolded(modules: dict[int, nn.Module], actions: dict[int, Condense]) -> Iterator[None]:
    """Inside the block each module's down columns are divided by their row scale and the scale is
    applied to the activations instead (same forward); on exit the columns are folded back."""
    handles, folded = [], []
    try:
        for i, m in modules.items():
            down = m.down_proj.weight
            scale = row_scales(m, actions[i]).to(down.device)
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            with torch.no_grad():
                down.copy_((down.float() / safe * (scale != 0)).to(down.dtype))
            folded.append((down, scale))
            handles.append(m.down_proj.register_forward_pre_hook(_scale_input(scale)))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for down, scale in folded:
                down.copy_((down.float() * scale.to(down.device)).to(down.dtype))
