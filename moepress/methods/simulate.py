"""Run a model as if some layers' plan actions were applied, without surgery.

Search scores thousands of candidate plans; rebuilding modules for each would cost more than the
forward pass it scores. Instead each affected MoE block's `forward` is shadowed, for the duration
of a `with` block, by `MoEBlock.forward(x, action)` — the view's re-implementation of the block
under a keep/prune/condense/drop action. Nothing is copied and nothing is left behind: leaving the
`with` block restores the module exactly as it was (its class `forward` or a previous instance one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock
from moepress.plan import LayerAction

_MISSING = object()


@contextmanager
def forward_replaced(module: nn.Module, forward: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Shadow `module.forward` with `forward` inside the block (hooks on the module still run)."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    try:
        yield
    finally:
        if previous is _MISSING:
            del module.forward
        else:
            module.forward = previous


def _action_forward(
    block: MoEBlock, action: LayerAction, novices: dict[int, torch.Tensor] | None
) -> Callable[..., torch.Tensor]:
    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        bound = block.bind(hidden_states, *args, **kwargs)  # routes (and hands on) as this call does
        return bound.wrap_output(bound.forward(hidden_states, action, novices))

    return forward


@contextmanager
def actions_applied(
    blocks: Mapping[int, MoEBlock],
    actions: Mapping[int, LayerAction],
    novices: Mapping[int, dict[int, torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Inside the block, each layer `i` in `actions` computes its MoE MLP under `actions[i]`.

    `blocks` are the model's MoE views (`adapter.blocks(model)`); layers not in `actions` and
    `keep` actions run their own, unmodified forward. `novices[i]` are layer i's novice vectors
    (prune actions with novices only).
    """
    novices = novices or {}
    patched: list[tuple[nn.Module, object]] = []
    try:
        for i, action in actions.items():
            if action.action == "keep":
                continue
            if getattr(action, "merges", None):
                # MoEBlock.forward routes among kept experts with their own weights, not the merged ones
                raise MoepressError(f"layer {i}: a plan with merged experts cannot be simulated; apply it instead")
            module = blocks[i].module
            patched.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = _action_forward(blocks[i], action, novices.get(i))
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def plan_simulated(model: nn.Module, plan) -> Iterator[nn.Module]:
    """`with plan_simulated(model, plan) as m:` — `m` (the same model) computes as if `plan` were applied.

    Numerically this is the MoEBlock re-implementation, not the dense module surgery builds, so
    logits agree with the applied model to float rounding, not bit for bit.
    """
    from moepress.models import get_adapter

    blocks = get_adapter(model).blocks(model)
    novices = {i: plan.novices(i) for i in plan.layers}
    with actions_applied(blocks, dict(plan.layers), novices):
        yield model
