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
        from moepress.quant.requantize import load_kwargs, passed_config_quietly

        with passed_config_quietly():
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
    compare_weights(model.state_dict(), reloaded, tolerance, "written")


def compare_weights(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], tolerance: float, what: str) -> None:
    """Raise unless every weight of `got` equals `want`'s or lies within `tolerance` of it (relative RMS)."""
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            raise RuntimeError(f"the {what} checkpoint does not reproduce the model: {name} is missing or reshaped")
        if not w.is_floating_point() or torch.equal(g, w):
            continue
        err = ((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)).item()
        if not err <= tolerance:  # NaN fails too
            raise RuntimeError(f"the {what} checkpoint does not reproduce the model: {name} reads back {err:.3g} "
                               f"away (relative), more than the format's {tolerance}")
