"""Bad output paths and bad `eval`/`bench` arguments through the real entry point (`moepress.cli.main`):
exit code 2, one stderr line naming the fix, refused before any weight loads, nothing written (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DATA
from .test_reliability import run_main

ARGS = ["-n", "2", "--seq-len", "32"]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from moepress.pipeline import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("bad_outputs") / "tiny")


@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any command loads a model: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    import moepress.evaluate.output
    import moepress.models.loading

    monkeypatch.setattr(moepress.models.loading, "load_model", refuse)
    monkeypatch.setattr(moepress.evaluate.output, "_load_pair", refuse)


def one_line(args: list, fix: str) -> str:
    code, out, err = run_main(args)
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fix.lower() in lines[0].lower(), lines[0]
    return lines[0]


def commands(tiny: Path, out: Path) -> dict[str, list]:
    calib = DATA / "calib.txt"
    return {
        "compress": ["compress", tiny, "--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS, "-o", out],
        "calibrate": ["calibrate", tiny, "--data", calib, *ARGS, "-o", out],
        "plan": ["plan", tiny, "--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS, "-o", out],
        "demo-model": ["demo-model", "-o", out],
        "demo": ["demo", "--model", tiny, "--data", calib, "--eval-data", DATA / "dev.txt", "-o", out],
    }


@pytest.mark.parametrize("command", ["compress", "calibrate", "plan", "demo-model", "demo"])
@pytest.mark.parametrize("depth", ["child", "grandchild"])
def test_output_under_a_regular_file(tiny, afile, command, depth, no_weights):
    out = afile / "out" if depth == "child" else afile / "a" / "b" / "out"
    line = one_line(commands(tiny, out)[command], fix="is a file, not a folder")
    assert str(afile) in line and "choose another" in line
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in afile.parent.iterdir()) == ["afile"]


def test_apply_and_finetune_output_under_a_regular_file(tiny, afile, no_weights):
    one_line(["apply", tiny, afile, "-o", afile / "out"], fix="is a file, not a folder")
    one_line(["finetune", tiny, "--data", DATA / "calib.txt", "-o", afile / "out"], fix="is a file, not a folder")


def test_output_that_is_a_regular_file(tiny, afile, no_weights):
    args = [*commands(tiny, afile)["compress"], "--overwrite"]
    one_line(args, fix="is a file, not a folder; choose another output folder")
    assert afile.read_text() == "not a folder"


def test_report_output_under_a_regular_file(tiny, afile):
    one_line(["report", tiny, "-o", afile / "report.html"], fix="is a file, not a folder")


def test_missing_parent_names_mkdir(tiny, tmp_path, no_weights):
    one_line(commands(tiny, tmp_path / "nope" / "out")["compress"], fix="mkdir -p")


def test_eval_unknown_task_is_one_line(tiny, no_weights):
    pytest.importorskip("lm_eval")  # task names other than the local ones are lm-eval's
    line = one_line(["eval", tiny, "--tasks", "nosuchtask"], fix="unknown task(s) nosuchtask")
    assert "piqa" in line and "lm-eval ls tasks" in line


@pytest.mark.parametrize(
    "extra, fix",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-tokens", "1"], "--max-tokens must be at least 2"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_bad_numbers_are_one_line(tiny, extra, fix, no_weights):
    one_line(["eval", tiny, "--ppl", DATA / "dev.txt", *extra], fix=fix)


@pytest.mark.parametrize("extra", [["--batch-sizes", "0"], ["--new-tokens", "0"], ["--prompt-len", "0"]])
def test_bench_bad_numbers_are_one_line(tiny, extra, no_weights):
    one_line(["bench", tiny, "--against", tiny, *extra], fix="must be positive")
