"""Every refusal the inputs alone decide happens before any weight is read (`moepress.preflight`).

Each case runs the real entry point with the weight loaders replaced by functions that fail the test
(`no_weights`), so a refusal that came only after loading the model would show up as that failure,
not as the expected one-line error with exit code 2.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from moepress.errors import MoepressError

from .conftest import DATA, mini_model_path
from .test_reliability import refused, run_main

ARGS = ["-n", "2", "--seq-len", "32"]


class WeightsRead(AssertionError):
    """A weight loader ran although the inputs alone decided the outcome."""


@pytest.fixture(autouse=True)
def no_weights(monkeypatch, tmp_path):
    """Every way moepress reads weights fails the test; a private statistics cache; quiet progress bars."""
    import sys

    import transformers

    import moepress.calibrate.streaming as streaming
    import moepress.io
    import moepress.models.loading as loading
    import moepress.pipeline as pipeline

    def read(*args, **kwargs):
        raise WeightsRead(f"weights were read: {args[:1]}")

    # moepress.io.load is both a module and (re-exported by moepress.io) its function `load`
    for module, name in ((loading, "load_model"), (pipeline, "load_model"), (moepress.io, "load"),
                         (sys.modules["moepress.io.load"], "load"), (streaming, "Streamer")):
        monkeypatch.setattr(module, name, read)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", read)
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preflight")


@pytest.fixture(scope="module")
def tiny(base) -> Path:
    """The tiny DeepSeek-V2 demo checkpoint: 3 layers (layer 0 dense), 8 experts, top-2, 1024 positions."""
    from moepress.pipeline import write_demo_model

    return write_demo_model(base / "tiny")


@pytest.fixture(scope="module")
def dsv2() -> Path:
    """The bundled dsv2-mini: 8 layers (layer 0 dense), 64 routed experts, top-6."""
    return mini_model_path("dsv2-mini")


@pytest.fixture(scope="module")
def calib(base) -> Path:
    path = base / "calib.txt"
    path.write_text((DATA / "calib.txt").read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def bad_data(base) -> dict[str, Path]:
    """Data files that must be refused, by what is wrong with them."""
    files = {"empty": base / "empty.txt", "latin1": base / "latin1.txt", "short": base / "short.txt",
             "missing": base / "no-such-file.txt"}
    files["empty"].write_text("\n\n  \n")
    files["latin1"].write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 200)
    files["short"].write_text("a few words only")
    return files


FIXES = {"empty": "non-empty", "latin1": "utf-8", "short": "give more text", "missing": "does not exist"}


@pytest.fixture
def outs(tmp_path) -> Path:
    path = tmp_path / "outs"
    path.mkdir()
    return path


# ---- counts against the config -------------------------------------------------------------------------
def test_too_many_experts_is_refused_in_seconds(dsv2, calib, outs):
    """The reported failure: `--experts 500` on a 64-expert model started a search."""
    t = time.perf_counter()
    message = refused(["compress", dsv2, "--method", "cd-moe-sr", "--layers", "1", "--experts", "500", "--data",
                       calib, "-o", outs / "out"], fix="use --experts 1 to 64", inputs=(dsv2,), outs=outs)
    assert "500" in message and "64 routed experts" in message
    assert time.perf_counter() - t < 60  # seconds (an empty copy of the model), never a search


def test_too_many_experts_in_plan_and_the_api(dsv2, calib, outs):
    refused(["plan", dsv2, "--method", "cd-moe", "--layers", "1", "--experts", "65", "--data", calib,
             "-o", outs / "plan.json"], fix="use --experts 1 to 64", outs=outs)
    import moepress

    with pytest.raises(MoepressError, match="use --experts 1 to 64"):
        moepress.compress(dsv2, "cd-moe-sr", outs / "out", data=calib, layers=1, experts=65)


def test_experts_default_and_the_largest_count_pass_preflight(dsv2, calib):
    """`experts=None` (the method's default, top-k) and `experts=E` are accepted; the tokens are made from
    the tokenizer alone, in the layout the search will use."""
    from moepress.compression import build_recipe, preflight

    for experts in (None, 64):
        r = build_recipe(dsv2, "cd-moe-sr", None, data=calib, layers=1, experts=experts, n=2, seq_len=32,
                         need_output=False)
        tokenizer, batches = preflight(r)
        assert tokenizer is not None
        assert {tuple(b.input_ids.shape) for b in batches.values()} == {(2, 32)}


def test_too_many_layers(dsv2, calib, outs):
    refused(["compress", dsv2, "--method", "cd-moe-s", "--layers", "8", "--data", calib, "-o", outs / "out"],
            fix="use --layers 1 to 7", outs=outs)


def test_ratio_that_leaves_fewer_than_top_k(dsv2, calib, outs):
    message = refused(["compress", dsv2, "--method", "frequency", "--ratio", "0.95", "--data", calib, *ARGS,
                       "-o", outs / "out"], fix="ratio too high", outs=outs)
    assert "0.9062" in message  # (64 - 6) / 64, the largest ratio that leaves top-6 experts


def test_memory_budget_out_of_range(tiny, calib, outs):
    refused(["compress", tiny, "--method", "cd-moe", "--memory-budget", "1.5", "--data", calib, "-o",
             outs / "out"], fix="(0, 1)", outs=outs)


def test_unreachable_memory_budget(tiny, calib, outs):
    refused(["compress", tiny, "--method", "layer-drop", "--memory-budget", "0.05", "--data", calib, "-o",
             outs / "out"], fix="raise the budget", outs=outs)


# ---- the model's folder and family ---------------------------------------------------------------------
def test_dense_model(calib, outs, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from moepress.pipeline import byte_tokenizer

    dense = tmp_path / "dense"
    config = Qwen2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    for args in (["calibrate", dense, "--data", calib, *ARGS, "-o", outs / "stats"],
                 ["compress", dense, "--method", "mone", "--ratio", "0.25", "--data", calib, *ARGS, "-o",
                  outs / "out"]):
        assert "'qwen2'" in refused(args, fix="give a checkpoint of", outs=outs)


def test_unknown_family(tiny, calib, outs, tmp_path):
    model = Path(shutil.copytree(tiny, tmp_path / "acme"))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="acme_moe", architectures=["AcmeMoeForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    refused(["calibrate", model, "--data", calib, *ARGS, "-o", outs / "stats"], fix="check model_type", outs=outs)


def _later_families() -> list[str]:
    """A made-up family of a future transformers (on every release) and, on an old release, the first real
    family whose model type it lacks and the first whose model type it has but not the classes moepress reads."""
    from moepress.models.families import NEEDS_NEWER_TRANSFORMERS, supported_model_types, transformers_knows

    supported_model_types()  # registers the families, filling NEEDS_NEWER_TRANSFORMERS
    later = sorted(NEEDS_NEWER_TRANSFORMERS)
    unknown = [t for t in later if not transformers_knows(t)]
    known = [t for t in later if transformers_knows(t)]
    return ["acme2_moe", *unknown[:1], *known[:1]]


@pytest.mark.parametrize("model_type", _later_families())
def test_family_of_a_later_transformers(model_type, tiny, calib, outs, tmp_path, monkeypatch):
    """A family moepress declares for a later transformers than the installed one: one line naming the release."""
    from moepress.models.families import NEEDS_NEWER_TRANSFORMERS

    if model_type == "acme2_moe":
        monkeypatch.setitem(NEEDS_NEWER_TRANSFORMERS, model_type, "5.99")
    since = NEEDS_NEWER_TRANSFORMERS[model_type]
    model = Path(shutil.copytree(tiny, tmp_path / model_type))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type)
    (model / "config.json").write_text(json.dumps(config))
    for args in (["inspect", model], ["calibrate", model, "--data", calib, *ARGS, "-o", outs / "stats"]):
        message = refused(args, fix="pip install -U transformers", outs=outs)
        assert f"model type '{model_type}' needs transformers >= {since}" in message


def test_remote_code_needs_the_flag(remote_code_dir, calib, outs):
    refused(["calibrate", remote_code_dir, "--data", calib, *ARGS, "-o", outs / "stats"], fix="--trust-remote-code",
            outs=outs)


def test_missing_weights(tiny, calib, outs, tmp_path):
    model = Path(shutil.copytree(tiny, tmp_path / "no-weights"))
    (model / "model.safetensors").unlink()
    refused(["calibrate", model, "--data", calib, *ARGS, "-o", outs / "stats"], fix="download the model files",
            outs=outs)


# ---- data ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", sorted(FIXES))
def test_bad_calibration_data(tiny, bad_data, outs, what):
    """calibrate, plan and compress refuse the file with the tokenizer alone."""
    data = bad_data[what]
    for args in (["calibrate", tiny, "--data", data, *ARGS, "-o", outs / "stats"],
                 ["plan", tiny, "--method", "frequency", "--ratio", "0.25", "--data", data, *ARGS, "-o",
                  outs / "plan.json"],
                 ["compress", tiny, "--method", "cd-moe", "--layers", "1", "--data", data, *ARGS, "-o",
                  outs / "out"]):
        refused(args, fix=FIXES[what], inputs=(tiny,), outs=outs)


def test_bad_calibration_data_on_a_real_checkpoint(dsv2, bad_data, outs):
    """The reported case: `calibrate MODEL --data empty.txt` loaded the whole model first."""
    for what in ("empty", "latin1"):
        refused(["calibrate", dsv2, "--data", bad_data[what], "-o", outs / "stats"], fix=FIXES[what], outs=outs)


def test_too_few_tokens_for_the_defaults(dsv2, calib, outs):
    """20 kB of text is far fewer than 128 × 512 tokens (the statistics defaults)."""
    refused(["compress", dsv2, "--method", "mone", "--ratio", "0.25", "--data", calib, "-o", outs / "out"],
            fix="give more text", outs=outs)


def test_sequence_longer_than_the_config_allows(tiny, calib, outs):
    refused(["calibrate", tiny, "--data", calib, "-n", "2", "--seq-len", "2048", "-o", outs / "stats"],
            fix="--seq-len 1024", outs=outs)


def test_eval_finetune_bench_demo_check_their_inputs_first(tiny, bad_data, calib, outs, tmp_path):
    empty = bad_data["empty"]
    refused(["eval", tiny, "--ppl", empty], fix="non-empty")
    refused(["eval", tiny, "--ppl", bad_data["latin1"]], fix="utf-8")
    refused(["bench", tiny, "--against", tmp_path / "nope"], fix="does not exist")
    refused(["finetune", tiny, "--data", empty, "-o", outs / "ft"], fix="non-empty", outs=outs)
    refused(["finetune", tiny, "--data", calib, "--eval-data", bad_data["latin1"], "-o", outs / "ft"],
            fix="utf-8", outs=outs)
    refused(["demo", "--model", tiny, "--data", empty, "--eval-data", calib, "-o", outs / "demo"],
            fix="non-empty", outs=outs)


# ---- plans against the config --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_json(tiny) -> dict:
    """A valid frequency plan for the tiny model, as JSON (made without its weights: no fingerprint)."""
    keep = list(range(6))
    return {"version": 1, "method": "frequency", "layers": {"1": {"action": "prune", "keep_experts": keep},
                                                            "2": {"action": "prune", "keep_experts": keep}}}


@pytest.mark.parametrize("change, fix", [
    ({"1": {"action": "prune", "keep_experts": [0, 1, 2, 99]}}, "0..7"),
    ({"0": {"action": "condense", "experts": [], "weights": []}}, "not an MoE layer"),
    ({"5": {"action": "drop"}}, "does not exist"),
    ({"2": {"action": "prune", "keep_experts": [3]}}, "keep at least 2"),
], ids=["expert-id", "dense-layer", "no-such-layer", "below-top-k"])
def test_plan_against_the_config(tiny, plan_json, outs, tmp_path, change, fix):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan_json, "layers": {**plan_json["layers"], **change}}))
    refused(["apply", tiny, path, "-o", outs / "out"], fix=fix, inputs=(tiny, path), outs=outs)
    refused(["apply", tiny, path, "-o", outs / "out", "--stream"], fix=fix, outs=outs)


def test_a_valid_plan_reaches_the_weights(tiny, plan_json, outs, tmp_path):
    """The checks pass a plan that fits: the run goes on to read the weights (here: the patched loader)."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_json))
    with pytest.raises(WeightsRead):
        run_main(["apply", tiny, path, "-o", outs / "out"])


def test_moe_family_without_an_adapter(calib, outs, tmp_path, monkeypatch):
    """An MoE model type of transformers that moepress has no adapter for: one line naming the model type
    and the reason, from `inspect` and `compress`, before any weight is read. (Every MoE family of the
    installed transformers has an adapter, so one is taken away here, as a new release's family would be.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moepress.models import base
    from moepress.models.families import NO_ADAPTER_YET
    from moepress.pipeline import byte_tokenizer

    model_type = "zaya"
    monkeypatch.setattr(base, "_REGISTRY", [a for a in base._REGISTRY if model_type not in a.model_types])
    monkeypatch.setitem(NO_ADAPTER_YET, model_type, "its router takes state carried from the previous layer")
    config = AutoConfig.for_model(model_type)  # full size: only an empty (meta) copy is ever built
    folder = tmp_path / model_type
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)  # the config builds: the refusal is moepress's
    config.save_pretrained(folder)
    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, folder / "model.safetensors")  # a valid header; never read
    byte_tokenizer().save_pretrained(folder)
    for args in (["inspect", folder],
                 ["compress", folder, "--method", "mone", "--ratio", "0.25", "--data", calib, *ARGS, "-o",
                  outs / "out"]):
        message = refused(args, fix="no adapter", outs=outs)
        assert "'zaya'" in message and NO_ADAPTER_YET[model_type] in message
