"""Resumable calibration: after each decoder layer, its statistics and the hidden states entering
the next layer are written to `OUT.partial/`; `--resume` continues from the last finished layer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from moepress.calibrate.runner import CalibrationResult, LayerInputs, calibrate
from moepress.calibrate.stats import CalibrationStats, LayerStats


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


class Checkpointer:
    """The `on_layer` callback that records progress, each file replaced atomically."""

    def __init__(self, folder: Path, data_fingerprint: str):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = data_fingerprint

    def __call__(self, i: int, stats: LayerStats | None, inputs: LayerInputs) -> None:
        if stats is not None:
            CalibrationStats({i: stats}).save(self.folder / f"layer_{i}")
        tmp = self.folder / "hidden.pt.tmp"
        torch.save({"hidden": inputs.hidden, "kwargs": inputs.kwargs, "layer_kwargs": inputs.layer_kwargs,
                    "state": inputs.state}, tmp)
        os.replace(tmp, self.folder / "hidden.pt")
        state = {"last_layer": i, "data_fingerprint": self.fingerprint}
        (self.folder / "state.json.tmp").write_text(json.dumps(state))
        os.replace(self.folder / "state.json.tmp", self.folder / "state.json")


def load_progress(folder: Path, data_fingerprint: str) -> tuple[int, CalibrationStats, LayerInputs] | None:
    """(next layer, statistics so far, inputs of the next layer), or None when nothing matches."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state.get("data_fingerprint") != data_fingerprint:
        return None  # progress of another run: start over
    saved = torch.load(folder / "hidden.pt", weights_only=True)  # tensors, tuples, dicts only
    stats = CalibrationStats({})
    for d in sorted(folder.glob("layer_*")):
        stats.merge(CalibrationStats.load(d))
    return state["last_layer"] + 1, stats, LayerInputs(
        hidden=saved["hidden"], kwargs=saved["kwargs"], layer_kwargs=saved.get("layer_kwargs", {}),
        position=state["last_layer"] + 1, state=saved.get("state", []))


def calibrate_resumable(model, input_ids, out: str | Path, data_fingerprint: str, resume: bool = False,
                        **kwargs) -> CalibrationResult:
    """`calibrate`, recording progress under `OUT.partial/` and continuing it when `resume`."""
    folder = partial_dir(out)
    start, done, inputs = 0, CalibrationStats({}), None
    if resume and (progress := load_progress(folder, data_fingerprint)) is not None:
        start, done, inputs = progress
    elif folder.exists():
        shutil.rmtree(folder)
    result = calibrate(model, input_ids, start_layer=start, inputs=inputs,
                       on_layer=Checkpointer(folder, data_fingerprint), **kwargs)
    done.merge(result.stats)
    result.stats.layers = dict(sorted(done.layers.items()))
    return result


def finish(out: str | Path) -> None:
    shutil.rmtree(partial_dir(out), ignore_errors=True)
