"""Quantised outputs: a quantised input's format kept (`keep_input_format`: sliced weights copied with their
scales, new ones quantised alike) or a float output quantised on the way out (`quantize_output`,
`--quantize`), each recorded in the manifest and the model card and checked against the in-memory model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from moepress.io.load import load
from moepress.io.manifest import MANIFEST_FILE
from moepress.io.model_card import write_model_card
from moepress.io.verify import compare_weights, probe_ids, verify_checkpoint, verify_weights
from moepress.quant.requantize import stored_bytes


def keep_input_format(model: nn.Module, tmp: Path, source: Path, scheme, plain: bool, trust_remote_code: bool,
                      verify: bool) -> None:
    """Rewrite the float folder `tmp` in the quantised format of its input `source` (sliced weights copied
    with their scales, new ones quantised), record it in the manifest, and check the result still
    reproduces `model` within the format's rounding."""
    report = requantize_output(tmp, source, scheme)
    if verify and not report.quantized:  # every weight copied or left as written: exact
        verify_checkpoint(model, tmp, plain=plain, trust_remote_code=trust_remote_code)
    elif verify:  # new weights carry the format's rounding: each weight within it, the rest exact
        verify_weights(model, tmp, plain=plain, trust_remote_code=trust_remote_code, tolerance=scheme.tolerance)


def requantize_output(tmp: Path, source: Path, scheme):
    """`requantize_folder` and its record in the manifest: what was copied, quantised or left in float, and
    the weight shards' bytes as stored before and after."""
    from moepress.quant.requantize import requantize_folder

    report = requantize_folder(tmp, source, scheme)
    manifest = json.loads((tmp / MANIFEST_FILE).read_text())
    manifest["quantization"] = report.as_dict()
    manifest["stored_bytes_before"] = stored_bytes(source)
    manifest["stored_bytes_after"] = stored_bytes(tmp)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    write_model_card(tmp, source)  # with the stored bytes
    return report


def quantize_output(model, tmp: Path, source: Path | None, scheme_name: str, plain: bool, trust_remote_code: bool,
                    verify: bool, calibration: torch.Tensor | None = None) -> dict:
    """`save_compressed(quantize=...)`: quantise the written, verified float folder `tmp` in place, record
    it in the manifest and the model card, and check the reload against `model` within the scheme's
    rounding. `model` None (a streamed output, no model in memory): every weight is checked as it is
    quantised instead."""
    from moepress.quant.export import quantize_folder

    stored_before = stored_bytes(tmp)
    report = quantize_folder(tmp, scheme_name, calibration=calibration, check_weights=verify and model is None)
    manifest_path = tmp / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        manifest["quantization"] = {
            "scheme": f"compressed-tensors {scheme_name}",
            "quantize": scheme_name,
            "copied": 0,
            "quantized": report["quantized"] if isinstance(report["quantized"], list) else [],
            "unquantized": sorted(report["ignored"]),
        }
        manifest["stored_bytes_before"] = stored_before
        manifest["stored_bytes_after"] = stored_bytes(tmp)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        write_model_card(tmp, source)
    if verify and model is not None:
        report["logit_difference"] = verify_quantized(model, tmp, scheme_name, plain, trust_remote_code)
    return report


def verify_quantized(model, folder: Path, scheme_name: str, plain: bool, trust_remote_code: bool = False) -> float:
    """Reload the quantised `folder` as its users will (plain transformers for a plain folder, else
    moepress.load) and compare its logits with the float `model`'s; raise past the scheme's tolerance
    (relative RMS difference). Returns that difference."""
    from transformers import AutoModelForCausalLM

    from moepress.quant.export import PRESETS

    p = next(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compressed-tensors' deprecation chatter
        if plain:
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=p.dtype).eval()
        else:
            reloaded = load(folder, dtype=p.dtype, device="cpu", trust_remote_code=trust_remote_code)
    ids = probe_ids(model.config.get_text_config().vocab_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        want = model(ids.to(p.device)).logits.float().cpu()
        got = reloaded(ids.to(next(reloaded.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    # every weight as transformers reads it back, within the scheme's rounding: what proves the checkpoint
    # right (how far the logits move depends on the model as much as on the scheme: a random tiny model's
    # move far more than a trained one's), the logits' difference is reported, and must be finite
    tol = PRESETS[scheme_name].weight_tolerance if scheme_name in PRESETS else PRESETS["w4a16"].weight_tolerance
    compare_weights(model.state_dict(), reloaded.state_dict(), tol, f"{scheme_name}-quantised")
    del reloaded
    diff = ((want - got).norm() / want.norm().clamp(min=1e-12)).item()
    if not diff < float("inf"):  # NaN fails too
        raise RuntimeError(f"the {scheme_name}-quantised checkpoint gives non-finite logits")
    return diff

