"""Bad inputs through the real entry point (`moepress.cli.main`): each is refused with exit code 2 and one
line on stderr that names the fix, writes nothing (no output, no temporary folder beside it) and leaves the
input checkpoint's bytes as they were. Also: interrupted runs, pickle weights, determinism."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import DATA

REPO = Path(__file__).resolve().parents[1]
ARGS = ["-n", "2", "--seq-len", "32"]


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def quiet(tmp_path_factory):
    """A private statistics cache and no weight-loading progress bars (so stderr is only the error)."""
    from transformers.utils import logging as hf_logging

    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()
    mp.undo()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def tiny(base) -> Path:
    """The tiny DeepSeek-V2 demo checkpoint (3 layers, 8 experts, byte tokenizer, 1024 positions)."""
    from moepress.pipeline import write_demo_model

    return write_demo_model(base / "tiny")


@pytest.fixture(scope="module")
def calib(base) -> Path:
    path = base / "calib.txt"
    path.write_text((DATA / "calib.txt").read_text()[:20_000])
    return path


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, for cases that damage it."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty folder to write outputs into; it must still be empty after a refused run."""
    path = tmp_path / "outs"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def plan_file(tiny, calib, base) -> Path:
    """A frequency plan for the tiny model."""
    code, out, err = run_main(["plan", tiny, "--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS,
                               "-o", base / "plan.json"])
    assert code == 0, err
    return base / "plan.json"


# ---- helpers -------------------------------------------------------------------------------------------
def run_main(args: list) -> tuple[int, str, str]:
    """`moepress ARGS` in this process through `main()` (what the console script runs): (exit code, stdout,
    stderr). An exception other than SystemExit escapes: that is a bug, and the test shows its traceback."""
    from moepress.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["moepress", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(args: list, *, fix: str, inputs: tuple[Path, ...] = (), outs: Path | None = None) -> str:
    """Run `args`, expect exit code 2 and one stderr line containing `fix`; nothing written into `outs`,
    every file of `inputs` unchanged. Returns the message."""
    before = {p: tree_hash(p) for p in inputs}
    code, out, err = run_main(args)
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fix.lower() in lines[0].lower(), lines[0]
    if outs is not None:
        assert sorted(p.name for p in outs.iterdir()) == [], "a refused run left files behind"
    for p, h in before.items():
        assert tree_hash(p) == h, f"{p} changed"
    return lines[0]


def compress(model: Path, calib: Path, out: Path, *extra) -> list:
    return ["compress", model, "--method", "mone", "--ratio", "0.25", "--data", calib, *ARGS, "-o", out, *extra]


def edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


# ---- the model -----------------------------------------------------------------------------------------
def test_wrong_model_path(calib, outs, tmp_path):
    refused(compress(tmp_path / "no-such-model", calib, outs / "out"), fix="does not exist", outs=outs)


def test_dense_model_is_refused(calib, outs, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from moepress.pipeline import byte_tokenizer

    dense = tmp_path / "dense"
    config = Qwen2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    message = refused(compress(dense, calib, outs / "out"), fix="give a checkpoint of", inputs=(dense,), outs=outs)
    assert "'qwen2'" in message
    assert "deepseek_v2" in message  # says which families do work


@pytest.mark.parametrize("where", ["length", "header"])
def test_corrupt_shard(model, calib, outs, where):
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    if where == "length":
        data[:8] = b"\xff" * 8  # a header length no file has
    else:
        data[8:40] = b"{not json" + b"\x9f" * 23  # the header itself
    shard.write_bytes(bytes(data))
    refused(compress(model, calib, outs / "out"), fix="download it again", inputs=(model,), outs=outs)


def test_truncated_shard(model, calib, outs):
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = refused(compress(model, calib, outs / "out"), fix="download it again", inputs=(model,), outs=outs)
    assert "model.safetensors" in message


def test_missing_tokenizer(model, calib, outs):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    refused(compress(model, calib, outs / "out"), fix="tokenizer", inputs=(model,), outs=outs)


def test_unknown_family(model, calib, outs):
    edit_config(model, model_type="acme_moe", architectures=["AcmeMoeForCausalLM"])
    message = refused(compress(model, calib, outs / "out"), fix="check model_type", inputs=(model,), outs=outs)
    assert "'acme_moe'" in message and "deepseek_v2" in message


def test_nan_in_weights(model, calib, outs):
    from safetensors.torch import load_file, save_file

    shard = model / "model.safetensors"
    weights = load_file(shard)
    weights["model.layers.1.mlp.experts.3.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, shard, metadata={"format": "pt"})
    message = refused(compress(model, calib, outs / "out"), fix="download it again", inputs=(model,), outs=outs)
    assert "NaN" in message


def test_remote_code_needs_the_flag(remote_code_dir, calib, outs):
    refused(compress(remote_code_dir, calib, outs / "out"), fix="--trust-remote-code", inputs=(remote_code_dir,),
            outs=outs)


def test_pickle_weights_need_the_flag_and_load_weights_only(tiny, calib, outs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    pickled = Path(shutil.copytree(tiny, tmp_path / "pickled"))
    state = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    refused(compress(pickled, calib, outs / "out"), fix="--allow-pickle", inputs=(pickled,), outs=outs)

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    before = tree_hash(pickled)
    code, _, err = run_main(compress(pickled, calib, outs / "out", "--allow-pickle"))
    assert code == 0, err
    assert calls and all(w is True for w in calls), calls
    assert tree_hash(pickled) == before
    assert (outs / "out" / "model.safetensors").is_file()


class _CreatesAFile:
    """A pickle payload: unpickling it without weights_only would create the file `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_even_with_the_flag(tiny, calib, outs, tmp_path):
    evil = Path(shutil.copytree(tiny, tmp_path / "evil"))
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": _CreatesAFile(marker)}, evil / "pytorch_model.bin")
    message = refused(compress(evil, calib, outs / "out", "--allow-pickle"), fix="safetensors copy",
                      inputs=(evil,), outs=outs)
    assert "more than tensors" in message
    assert not marker.exists()


# ---- plans ---------------------------------------------------------------------------------------------
def test_plan_made_for_another_model(plan_file, outs, tmp_path):
    from moepress.pipeline import write_demo_model

    other = write_demo_model(tmp_path / "other", seed=1)  # same architecture, other weights
    refused(["apply", other, plan_file, "-o", outs / "out"], fix="re-run `moepress plan`",
            inputs=(other, plan_file), outs=outs)


def test_plan_with_out_of_range_experts(tiny, plan_file, outs, tmp_path):
    bad = tmp_path / "bad-plan.json"
    plan = json.loads(plan_file.read_text())
    plan["layers"]["1"]["keep_experts"] = [0, 1, 2, 3, 4, 99]
    bad.write_text(json.dumps(plan))
    message = refused(["apply", tiny, bad, "-o", outs / "out"], fix="99", inputs=(tiny, bad), outs=outs)
    assert "0..7" in message


@pytest.mark.parametrize("ratio", ["0", "1", "-0.25", "nan"])
def test_ratio_out_of_range(tiny, calib, outs, ratio):
    args = compress(tiny, calib, outs / "out")
    args[args.index("--ratio") + 1] = ratio
    refused(args, fix="--ratio 0.25", inputs=(tiny,), outs=outs)


def test_ratio_out_of_range_in_plan(tiny, calib, outs):
    refused(["plan", tiny, "--method", "frequency", "--ratio=1.5", "--data", calib, "-o", outs / "p.json"],
            fix="--ratio 0.25", inputs=(tiny,), outs=outs)


def test_impossible_memory_budget(tiny, calib, outs):
    refused(["compress", tiny, "--method", "cd-moe", "--memory-budget", "0.05", "--data", calib, *ARGS, "-o",
             outs / "out"], fix="raise the budget", inputs=(tiny,), outs=outs)


def test_unknown_method(tiny, calib, outs):
    args = compress(tiny, calib, outs / "out")
    args[args.index("--method") + 1] = "magic"
    message = refused(args, fix="choose one of", inputs=(tiny,), outs=outs)
    assert "mone" in message


# ---- data ----------------------------------------------------------------------------------------------
def test_missing_data_file(tiny, outs, tmp_path):
    refused(compress(tiny, tmp_path / "nope.txt", outs / "out"), fix="does not exist", inputs=(tiny,), outs=outs)


def test_empty_data_file(tiny, outs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    refused(compress(tiny, empty, outs / "out"), fix="non-empty", inputs=(tiny,), outs=outs)


def test_non_utf8_data_file(tiny, outs, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 200)
    refused(["calibrate", tiny, "--data", latin, "-o", outs / "stats", *ARGS], fix="utf-8", inputs=(tiny,),
            outs=outs)


def test_too_little_data(tiny, outs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    refused(compress(tiny, short, outs / "out"), fix="give more text", inputs=(tiny,), outs=outs)


def test_sequence_longer_than_the_model_allows(tiny, calib, outs):
    args = compress(tiny, calib, outs / "out")
    args[args.index("--seq-len") + 1] = "2048"
    refused(args, fix="--seq-len 1024", inputs=(tiny,), outs=outs)


# ---- the output ----------------------------------------------------------------------------------------
def test_output_is_the_input(model, calib):
    refused(compress(model, calib, model), fix="choose another output", inputs=(model,), outs=None)
    assert not list(model.parent.glob("model.tmp-*"))


def test_existing_output_is_kept(tiny, calib, outs):
    (outs / "out").mkdir()
    (outs / "out" / "mine.txt").write_text("keep me")
    code, _, err = run_main(compress(tiny, calib, outs / "out"))
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in outs.iterdir()] == ["out"] and (outs / "out" / "mine.txt").read_text() == "keep me"


def test_read_only_output_folder(tiny, calib, outs):
    outs.chmod(0o555)
    try:
        probe = outs / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:  # root ignores the mode bits
            probe.rmdir()
            pytest.skip("running as root: a read-only folder is still writable")
        refused(compress(tiny, calib, outs / "out"), fix="choose another output", inputs=(tiny,), outs=outs)
    finally:
        outs.chmod(0o755)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_disk_full_while_writing(tiny, calib, outs, monkeypatch, existing):
    """The shard writer fails half-way with ENOSPC: nothing new is left, an older output stays whole."""
    import transformers.modeling_utils as modeling_utils

    extra = []
    if existing:
        (outs / "out").mkdir()
        (outs / "out" / "model.safetensors").write_bytes(b"previous result")
        extra = ["--overwrite"]

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    before = tree_hash(outs)
    message = refused(compress(tiny, calib, outs / "out", *extra), fix="free space", inputs=(tiny,),
                      outs=None if existing else outs)
    assert f"writing {outs / 'out'};" in message  # the user's folder, not a temporary one
    assert tree_hash(outs) == before


def test_interrupted_runs_leave_nothing_half_written(tiny, calib, tmp_path):
    """SIGINT and SIGKILL of `moepress compress` while it writes: OUT never exists half-written, and a later
    run succeeds (and clears the temporary folder a killed run could not)."""
    script = tmp_path / "slow_writer.py"
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have ignored it\n"
        "from pathlib import Path\n"
        "import moepress.io.save as save\n"
        "marker = Path(sys.argv.pop(1))\n"
        "real = save.verify_checkpoint\n"
        "def slow(*args, **kwargs):\n"
        "    marker.write_text('writing')\n"
        "    time.sleep(120)\n"
        "    return real(*args, **kwargs)\n"
        "save.verify_checkpoint = slow\n"
        "sys.argv[0] = 'moepress'\n"
        "from moepress.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOEPRESS_QUIET": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    runs = {}
    for sig in (signal.SIGINT, signal.SIGKILL):
        outs = tmp_path / sig.name
        outs.mkdir()
        marker = tmp_path / f"{sig.name}.writing"
        args = [str(a) for a in compress(tiny, calib, outs / "out")][1:]
        proc = subprocess.Popen([sys.executable, str(script), str(marker), "compress", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[sig] = (proc, outs, marker)
    for sig, (proc, outs, marker) in runs.items():
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        assert [p.name for p in outs.iterdir()][0].startswith("out.tmp-")  # writing, in a temporary folder
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert not (outs / "out").exists()
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted; nothing was written"]
            assert list(outs.iterdir()) == []
        else:
            assert proc.returncode == -signal.SIGKILL
    for _, outs, _ in runs.values():
        code, _, err = run_main(compress(tiny, calib, outs / "out"))
        assert code == 0, err
        assert [p.name for p in outs.iterdir()] == ["out"]  # the killed run's temporary folder is gone


def test_usage_error_is_not_a_traceback(tiny, calib, outs):
    """typer >= 0.22 raises its own (vendored) click's exceptions; they are usage errors all the same."""
    code, _, err = run_main([*compress(tiny, calib, outs / "out"), "--no-such-flag"])
    assert code == 2 and "No such option: --no-such-flag" in err and "Traceback" not in err
    assert list(outs.iterdir()) == []


def test_cli_entry_point_exit_code(tmp_path):
    """The console script itself (`python -m moepress`): exit code 2 and one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "moepress", "inspect", str(tmp_path / "nope")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path {tmp_path / 'nope'} does not exist; pass a "
                                                "Hugging Face checkpoint folder"]


# ---- determinism ---------------------------------------------------------------------------------------
def test_same_inputs_give_identical_bytes(tiny, calib, tmp_path, monkeypatch):
    """Two runs with the same inputs and seed, each calibrating from scratch: byte-identical plan JSON and
    output weights."""
    folders = []
    for k in range(2):
        monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / f"cache{k}"))
        out = tmp_path / f"out{k}"
        assert run_main(compress(tiny, calib, out, "--seed", "3"))[0] == 0
        assert run_main(["plan", tiny, "--method", "random", "--ratio", "0.25", "--data", calib, *ARGS,
                         "--seed", "3", "-o", tmp_path / f"plan{k}.json"])[0] == 0
        folders.append(out)
    a, b = folders
    for name in ("model.safetensors", "moepress_plan.json", "moepress_plan.novices.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (tmp_path / "plan0.json").read_bytes() == (tmp_path / "plan1.json").read_bytes()
