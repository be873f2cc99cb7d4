"""The `moepress` command line end to end on a tiny checkpoint: calibrate → plan → apply, compress (cached
statistics, recipes that rerun byte-identically), diff, eval, bench, finetune and report; every written
folder reloads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moepress.cli import app

from .conftest import DATA, mini_model_path

runner = CliRunner()
ARGS = ["-n", "2", "--seq-len", "32"]  # calibration sizes: seconds, not minutes


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """A private statistics cache, so tests neither see nor leave entries in ~/.cache/moepress."""
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPRESS_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny(work) -> Path:
    """`moepress demo-model`: a 3-layer DeepSeek-V2 (2 MoE layers, 8 experts) with a byte tokenizer."""
    ok(["demo-model", "-o", str(work / "tiny")])
    return work / "tiny"


@pytest.fixture(scope="module")
def calib(work) -> Path:
    """A few kB of the shared calibration text (reading all of it would dominate the test time)."""
    path = work / "calib.txt"
    path.write_text((DATA / "calib.txt").read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def dev(work) -> Path:
    path = work / "dev.txt"
    path.write_text((DATA / "dev.txt").read_text()[:4_000])
    return path


def ok(args: list[str]) -> str:
    """Run the CLI in this process; fail with its output (and traceback) unless it exits 0."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        raise AssertionError(f"moepress {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}\n{tb}")
    return result.stdout


def generates(folder: Path, trust_remote_code: bool = False) -> None:
    """The written folder reloads (`moepress.load`) and decodes a few greedy tokens."""
    import moepress

    model = moepress.load(folder, trust_remote_code=trust_remote_code)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 7)
    assert ((0 <= new) & (new < model.config.vocab_size)).all()


@pytest.fixture(scope="module")
def stats(tiny, calib, work) -> Path:
    out = work / "stats"
    printed = ok(["calibrate", tiny, "--data", calib, "-o", out, *ARGS])
    assert "calibrated 2 MoE layers on 2×32 tokens" in printed
    assert (out / "stats.json").is_file()
    return out


@pytest.fixture(scope="module")
def plans(tiny, stats, work) -> dict[str, Path]:
    """`moepress plan` from statistics, one plan per method at --ratio 0.25."""
    out = {}
    for method in ("mone", "frequency"):
        path = work / f"{method}.json"
        printed = json.loads(ok(["plan", tiny, "--method", method, "--ratio", "0.25", "--stats", stats,
                                 "-o", path, "--json"]))
        assert printed == {"plan": str(path), "method": method, "actions": {"prune": 2}}
        out[method] = path
    return out


@pytest.fixture(scope="module")
def compressed(tiny, calib, work, cache) -> Path:
    """`moepress compress` with MoNE; the statistics land in the cache."""
    out = work / "mone-out"
    printed = json.loads(ok(["compress", tiny, "--method", "mone", "--ratio", "0.25", "--data", calib, *ARGS,
                             "-o", out, "--json"]))
    assert printed["method"] == "mone" and printed["actions"] == {"prune": 2}
    assert printed["bytes_after"] < printed["bytes_before"]
    return out


@pytest.fixture(scope="module")
def condensed(tiny, calib, work) -> Path:
    """`moepress compress --method cd-moe`: one condensed layer, for fine-tuning and the report."""
    out = work / "cdmoe-out"
    ok(["compress", tiny, "--method", "cd-moe", "--layers", "1", "--experts", "2", "--data", calib, *ARGS,
        "-o", out])
    return out


def test_plans_from_statistics(plans):
    for method, path in plans.items():
        plan = json.loads(path.read_text())
        assert plan["method"] == method
        for i in ("1", "2"):
            action = plan["layers"][i]
            assert action["action"] == "prune"
            assert len(action["keep_experts"]) + len(action["novices"]) in (6, 8)
    # MoNE keeps the pruned experts' ids as novices (their vectors in the sidecar); frequency drops them
    assert (plans["mone"].parent / "mone.novices.safetensors").is_file()
    assert all(len(json.loads(plans["frequency"].read_text())["layers"][i]["keep_experts"]) == 6 for i in "12")


def test_apply_writes_a_checkpoint_that_generates(tiny, plans, work):
    out = work / "applied"
    printed = ok(["apply", tiny, plans["frequency"], "-o", out])
    assert "frequency" in printed and "plain transformers" in printed
    assert (out / "model.safetensors").is_file() and (out / "moepress_plan.json").is_file()
    generates(out)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_routed_experts == 6  # plain architecture


def test_compress_writes_everything_and_generates(compressed):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "moepress_plan.json",
                 "moepress_manifest.json", "moepress_recipe.yaml", "moepress_run.json", "report.html"):
        assert (compressed / name).is_file(), name
    assert (compressed / "moepress_stats" / "stats.json").is_file()
    generates(compressed)


def test_second_compress_reuses_cached_statistics(tiny, calib, work, compressed, cache, monkeypatch):
    entries = list((cache / "stats").iterdir())
    assert len(entries) == 1
    stamp = (entries[0] / "stats.json").stat().st_mtime_ns

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again instead of reusing the cache")

    monkeypatch.setattr("moepress.pipeline.calibrate", no_calibration)
    out = work / "mone-again"
    ok(["compress", tiny, "--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS, "-o", out])
    assert list((cache / "stats").iterdir()) == entries
    assert (entries[0] / "stats.json").stat().st_mtime_ns == stamp
    stats_a = json.loads((compressed / "moepress_stats" / "stats.json").read_text())
    stats_b = json.loads((out / "moepress_stats" / "stats.json").read_text())
    assert stats_a["meta"]["data_fingerprint"] == stats_b["meta"]["data_fingerprint"]


def test_recipe_reruns_to_identical_weights(tiny, calib, work, monkeypatch):
    recipe = work / "mixed.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "tiny", "data": {"path": "calib.txt", "n": 2, "seq_len": 32},  # relative to the recipe
        "methods": [{"method": "cd-moe-sr", "layers": "1", "num_layers": 1, "experts": 2},
                    {"method": "mone", "ratio": 0.25}],
    }))
    first = work / "recipe-a"
    ok(["compress", "--recipe", recipe, "-o", first])
    resolved = yaml.safe_load((first / "moepress_recipe.yaml").read_text())
    assert resolved["model"] == str(tiny) and resolved["data"]["path"] == str(calib)
    assert resolved["methods"][1]["hyperparameters"]  # every default written out
    plan = json.loads((first / "moepress_plan.json").read_text())
    assert {i: a["action"] for i, a in plan["layers"].items()} == {"1": "condense", "2": "prune"}

    second = work / "recipe-b"
    monkeypatch.chdir(work.parent)  # the resolved recipe holds absolute paths: it runs from anywhere
    ok(["compress", "--recipe", first / "moepress_recipe.yaml", "-o", second])
    for name in ("model.safetensors", "moepress_plan.json", "moepress_plan.novices.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    rerun = yaml.safe_load((second / "moepress_recipe.yaml").read_text())
    assert {**rerun, "output": None} == {**resolved, "output": None}
    generates(second)


def test_diff_of_plans_and_folders(plans, compressed):
    same = ok(["diff", plans["mone"], compressed])
    assert "the plans do the same thing" in same
    differences = json.loads(ok(["diff", plans["mone"], plans["frequency"], "--json"]))
    assert differences["a"] == "mone" and differences["b"] == "frequency"
    assert differences["differences"]


def test_eval_json_writes_results(compressed, tiny, dev):
    result = json.loads(ok(["eval", compressed, "--ppl", dev, "--against", tiny, "--max-tokens", "256",
                            "--batch-size", "2", "--device", "cpu", "--json"]))
    assert (compressed / "moepress_eval.json").is_file()
    written = json.loads((compressed / "moepress_eval.json").read_text())
    assert written["rows"] == result["rows"]
    text = json.dumps(result["rows"]).lower()
    assert "perplexity" in text
    values = [v for row in result["rows"] for v in row.values() if isinstance(v, float)]
    assert values and all(v == v for v in values)  # no NaN


def test_bench_on_cpu(compressed, tiny):
    printed = ok(["bench", compressed, "--against", tiny, "--prompt-len", "8", "--new-tokens", "2", "--repeats",
                  "1", "--device", "cpu"])
    assert "bytes ratio" in printed and "CPU timings" in printed
    data = json.loads((compressed / "moepress_bench.json").read_text())
    assert data["cpu_timing"] is True
    assert 0 < data["bytes_ratio"] < 1


def test_finetune_of_a_condensed_output(condensed, calib, work):
    out = work / "finetuned"
    printed = json.loads(ok(["finetune", condensed, "--data", calib, "--tokens", "256", "--seq-len", "32",
                             "--batch-size", "2", "--device", "cpu", "-o", out, "--json"]))
    plan = json.loads((condensed / "moepress_plan.json").read_text())
    condensed_layers = [int(i) for i, a in plan["layers"].items() if a["action"] == "condense"]
    assert printed["output"] == str(out) and printed["steps"] >= 1 and printed["layers"] == condensed_layers
    assert (out / "moepress_finetune.json").is_file()
    before = (condensed / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() != before  # the condensed layer trained
    generates(out)


def test_report(condensed, work):
    dest = work / "page.html"
    printed = ok(["report", condensed, "-o", dest])
    assert str(dest) in printed.replace("\n", "")
    page = dest.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype html")
    assert "cd-moe" in page


def test_compress_a_real_checkpoint(calib, work):
    """The bundled dsv2-mini (8 layers, 64 experts, top-6) through the whole command."""
    model = mini_model_path("dsv2-mini")
    out = work / "dsv2-mini-frequency"
    ok(["compress", model, "--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS, "-o", out])
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 48
    generates(out)
    # written in the source's stored dtype (bf16), although planning ran in float32 on CPU: the output
    # is smaller than the input on disk, by the plan's prediction
    from safetensors import safe_open

    assert config["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert (out / "model.safetensors").stat().st_size < 0.85 * source_bytes
