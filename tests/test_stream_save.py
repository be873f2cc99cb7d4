"""Streamed writing (one decoder layer at a time) gives the same checkpoint as the in-memory path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moepress
from moepress.calibrate import calibrate
from moepress.io import save_compressed
from moepress.io.stream_save import save_compressed_streaming
from moepress.methods import get_method
from moepress.models.loading import load_model
from moepress.plan import Condense, Drop
from moepress.surgery import apply_plan
from tests.conftest import mini_model_path


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def source_and_stats():
    src = mini_model_path("dsv2-mini")
    model, _ = load_model(src, dtype="bfloat16")
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    return src, calibrate(model, ids, batch_size=2).stats, ids


@pytest.mark.parametrize("kind", ["frequency", "mone", "condense+drop"])
def test_streamed_output_equals_in_memory_output(tmp_path, source_and_stats, kind):
    src, stats, ids = source_and_stats
    plan = get_method("mone" if kind != "frequency" else "frequency")(stats, 0.25)
    if kind == "condense+drop":
        plan.layers[2] = Condense(experts=[0, 5], weights=[0.1, 0.05])
        plan.layers[4] = Drop()
    model, _ = load_model(src, dtype="bfloat16")
    mem = save_compressed(apply_plan(model, plan), plan, tmp_path / "mem", source=src)
    streamed = save_compressed_streaming(src, plan, tmp_path / "stream", dtype=torch.bfloat16)

    a, b = _tensors(mem), _tensors(streamed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("moepress_plan.json", "config.json", "modeling_moepress.py", "moepress_modules.py"):
        assert (mem / name).is_file() == (streamed / name).is_file(), name
        if (mem / name).is_file():
            assert (mem / name).read_text() == (streamed / name).read_text(), name
    config = json.loads((streamed / "config.json").read_text())
    # MoNE keeps every router row: vLLM's native novice format, under the source model_type
    assert config["model_type"] == ("moepress_deepseek_v2" if kind == "condense+drop" else "deepseek_v2")
    assert ("approximate_experts" in config) == (kind == "mone")
    if kind == "frequency":  # expressible in the original architecture: plain transformers loads it
        reloaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.bfloat16)
    else:
        reloaded = moepress.load(streamed, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_streamed_write_refuses_to_overwrite_its_input(source_and_stats):
    src, stats, _ = source_and_stats
    with pytest.raises(moepress.errors.MoepressError):
        save_compressed_streaming(src, get_method("frequency")(stats, 0.25), src)


def test_apply_stream_command_writes_the_same_weights(tmp_path, source_and_stats):
    from typer.testing import CliRunner

    from moepress.cli import app
    from moepress.compression import write_plan

    src, stats, _ = source_and_stats
    plan = write_plan(get_method("mone")(stats, 0.25), tmp_path / "plan.json")
    runner = CliRunner()
    for name, extra in (("mem", []), ("stream", ["--stream"])):
        result = runner.invoke(app, ["apply", str(src), str(plan), "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
