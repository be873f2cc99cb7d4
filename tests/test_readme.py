"""Every ```python block of README.md runs as written, each in a fresh namespace and a fresh temporary
working directory (a block added to the README later is picked up automatically).

What is substituted, so the examples run offline in seconds:
- the placeholder `"path/to/model"` (any quoted `path/to/...model...`) becomes a tiny saved checkpoint
  (`moepress demo-model`: DeepSeek-V2 shape, 3 layers, 8 experts, byte-level tokenizer);
- every quoted relative `.txt` / `.jsonl` name that the block uses (`"calib.txt"`, `"data/dev.txt"`)
  is created in the working directory from the shared text: names with `dev`, `eval`, `test` or
  `heldout` from ../shared/data/dev.*, every other from ../shared/data/calib.*;
- the calibration defaults (`n` × `seq_len`, used when a block does not pass them) are lowered to
  4 × 64 tokens; statistics go to a private cache ($MOEPRESS_CACHE).
Anything else a block needs must be in the block. A block whose first line is `# readme-test: skip`
(e.g. one that needs a GPU or the network) is not run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .conftest import DATA

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MODEL_PLACEHOLDER = re.compile(r"""(["'])path/to/[^"']*model[^"']*\1""")
DATA_NAME = re.compile(r"""(["'])([\w./-]+\.(?:txt|jsonl))\1""")
SKIP = "# readme-test: skip"
SMALL_DEFAULTS = {"STATS_N": 4, "STATS_SEQ_LEN": 64, "SEARCH_N": 4, "SEARCH_SEQ_LEN": 64}


def python_blocks() -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block in README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from moepress.pipeline import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("readme") / "tiny-model")


def prepare(code: str, cwd: Path, model: Path) -> str:
    """The block with the model placeholder replaced, and its relative data files created in `cwd`."""
    code = MODEL_PLACEHOLDER.sub(repr(str(model)), code)
    for _, name in DATA_NAME.findall(code):
        path = cwd / name
        if Path(name).is_absolute() or path.exists():
            continue
        held_out = any(word in name.lower() for word in ("dev", "eval", "test", "heldout"))
        source = DATA / (("dev" if held_out else "calib") + Path(name).suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
    return code


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block; remove this test file if that is intended"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_python_block_runs(line, code, tiny, tmp_path, monkeypatch):
    if code.lstrip().startswith(SKIP):
        pytest.skip(f"README.md:{line} is marked {SKIP!r}")
    import moepress.recipe as recipe

    for name, value in SMALL_DEFAULTS.items():
        if hasattr(recipe, name):  # the calibration defaults a block gets when it passes no n / seq_len
            monkeypatch.setattr(recipe, name, value)
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    source = prepare(code, cwd, tiny)
    # blank lines in front: a traceback names the README's own line numbers
    exec(compile("\n" * line + source, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102
