"""Checking a written checkpoint against the in-memory model it was written from: reload it as its format
promises and compare logits (exact forms) or weights (new quantised weights, within the format's rounding)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moepress.io.load import load


def probe_ids(vocab_size: int, n: int = 12) -> torch.Tensor:
    """A few token ids spread over the vocabulary, as one sequence."""
    return torch.linspace(0, vocab_size - 1, n).long()[None]


def reload_checkpoint(model: nn.Module, folder: Path, plain: bool, trust_remote_code: bool = False) -> nn.Module:
    """`folder` loaded as its format promises, in `model`'s dtype and device: a plain folder with plain
    `AutoModelForCausalLM` (no custom code), any other through `moepress.load`."""
    from transformers import AutoModelForCausalLM

    p = next(model.parameters())
    if plain:
        from moepress.quant.requantize import load_kwargs

        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=p.dtype, **load_kwargs(folder))
        return reloaded.to(p.device).eval()
    return load(folder, dtype=p.dtype, device=p.device, trust_remote_code=trust_remote_code)


def verify_checkpoint(model: nn.Module, folder: Path, plain: bool, trust_remote_code: bool = False) -> None:
    """Reload `folder` and compare its logits with `model`'s; raise if the folder does not reproduce it."""
    p = next(model.parameters())
    reloaded = reload_checkpoint(model, folder, plain, trust_remote_code)
    ids = probe_ids(model.config.get_text_config().vocab_size).to(p.device)  # a VLM wrapper's is its text config's
    was_training = model.training
    model.eval()
    with torch.no_grad():
        want = model(ids).logits.float()
        got = reloaded(ids).logits.float()
    model.train(was_training)
    tol = 1e-5 if p.dtype == torch.float32 else 1e-2
    diff = (want - got).abs().max().item()
    if not diff <= tol * max(1.0, want.abs().max().item()):
        raise RuntimeError(f"the written checkpoint does not reproduce the model (max logit difference {diff:.3g})")


def verify_weights(model: nn.Module, folder: Path, plain: bool, trust_remote_code: bool, tolerance: float) -> None:
    """Reload `folder` and compare every weight with `model`'s: a quantised output whose new weights carry
    the format's rounding (relative error up to `tolerance`), everything else exact in the model's dtype."""
    reloaded = reload_checkpoint(model, folder, plain, trust_remote_code).state_dict()
    worst, where = 0.0, ""
    for name, want in model.state_dict().items():
        got = reloaded.get(name)
        if got is None or got.shape != want.shape:
            raise RuntimeError(f"the written checkpoint does not reproduce the model: {name} is missing or reshaped")
        if not want.is_floating_point() or torch.equal(got, want):
            continue
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
        if err > worst:
            worst, where = err, name
    if worst > tolerance:
        raise RuntimeError(f"the written checkpoint does not reproduce the model: {where} is off by {worst:.3g} "
                           f"(relative), more than the format's {tolerance}")
