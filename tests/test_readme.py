"""Every example of README.md, CONTRIBUTING.md and docs/*.md is run or parsed (a block added later is
picked up automatically):

- every ```python block of README.md and docs/*.md runs as written, each in a fresh namespace and a
  fresh temporary working directory;
- CONTRIBUTING.md's ```python blocks run in order, in one test (its worked method registers itself in
  a copy of the method registry, which the later blocks use). A block whose first line names a file,
  `# moepress/models/solar_open.py`, must be that file verbatim; `# <path>.py (new)` is a file of the
  worked example, run as a module; `# tests/<module>.py (added)` holds tests added to that module: they
  run in its namespace;
- every command, in ```bash blocks and in `code spans` of the prose that start with `moepress `,
  `python `, `torchrun `, `pip install ` or `ruff ` (after `VAR=value` or `time`), is parsed: a
  `moepress` command by the CLI's own parser (the subcommand exists, every option is one of its
  options, values have the right types, a block's command has every required argument; `...` or a
  prose span may leave some out), a script's file exists and names every option given, a test or
  repository path exists, an extra exists.

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

import copy
import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

from .conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
PAGES = (README, CONTRIBUTING, *sorted((ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MODEL_PLACEHOLDER = re.compile(r"""(["'])path/to/[^"']*model[^"']*\1""")
DATA_NAME = re.compile(r"""(["'])([\w./-]+\.(?:txt|jsonl))\1""")
SKIP = "# readme-test: skip"
SMALL_DEFAULTS = {"STATS_N": 4, "STATS_SEQ_LEN": 64, "SEARCH_N": 4, "SEARCH_SEQ_LEN": 64}


def python_blocks(page: Path = README) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block in `page`."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


# README's and docs/'s blocks, each on its own (CONTRIBUTING's run in order: see below)
BLOCKS = [(page, line, code) for page in PAGES if page != CONTRIBUTING for line, code in python_blocks(page)]


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


def _sandbox(tmp_path: Path, monkeypatch) -> Path:
    """Small calibration defaults, a private statistics cache, and a fresh working directory (returned)."""
    import moepress.recipe as recipe

    for name, value in SMALL_DEFAULTS.items():
        if hasattr(recipe, name):  # the calibration defaults a block gets when it passes no n / seq_len
            monkeypatch.setattr(recipe, name, value)
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _run(code: str, page: Path, line: int, namespace: dict) -> None:
    # blank lines in front: a traceback names the page's own line numbers
    exec(compile("\n" * line + code, str(page), "exec"), namespace)  # noqa: S102


def test_the_readme_has_python_examples():
    assert python_blocks(README), "README.md has no ```python block; remove this test file if that is intended"


@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS])
def test_python_block_runs(page, line, code, tiny, tmp_path, monkeypatch):
    if code.lstrip().startswith(SKIP):
        pytest.skip(f"{page.name}:{line} is marked {SKIP!r}")
    cwd = _sandbox(tmp_path, monkeypatch)
    _run(prepare(code, cwd, tiny), page, line, {"__name__": "__readme__"})


# `# moepress/models/x.py`: that file verbatim; `(new)`: a new file of a worked example; `(added)`: added tests
FILE_MARK = re.compile(r"# ((?:moepress|tests)/[\w/]+\.py)(?: \((new|added)\))?\n")


def test_contributing_examples_run_in_order(tiny, tmp_path, monkeypatch):
    import moepress.methods.base as methods_base

    for name in ("_METHODS", "_LAYER_INPUTS", "_SEQUENTIAL"):  # the worked method registers in a copy
        monkeypatch.setattr(methods_base, name, copy.copy(getattr(methods_base, name)))
    cwd = _sandbox(tmp_path, monkeypatch)
    blocks = python_blocks(CONTRIBUTING)
    assert blocks, "CONTRIBUTING.md has no ```python block"
    for line, code in blocks:
        mark = FILE_MARK.match(code)
        if mark and mark[2] is None:  # an existing file, shown whole
            assert code[mark.end():] == (ROOT / mark[1]).read_text(encoding="utf-8"), (
                f"CONTRIBUTING.md:{line} shows {mark[1]} as it no longer is: copy the file in again"
            )
        elif mark and mark[2] == "added":  # tests added to a test module, run with its helpers
            module = importlib.import_module(mark[1].removesuffix(".py").replace("/", "."))
            namespace = dict(vars(module))
            _run(code, CONTRIBUTING, line, namespace)
            added = [f for name, f in namespace.items() if name.startswith("test_") and name not in vars(module)]
            assert added, f"CONTRIBUTING.md:{line} adds no test"
            for test in added:
                test()
        else:  # a new file of a worked example (run as that module would be), or an example
            name = mark[1].removesuffix(".py").replace("/", ".") if mark else "__contributing__"
            _run(prepare(code, cwd, tiny), CONTRIBUTING, line, {"__name__": name})


# ---- commands ------------------------------------------------------------------------------------
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
ANY_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
COMMAND = re.compile(r"(?:[A-Z_][A-Z0-9_]*=\S+ )*(?:time )?(?:moepress|python|torchrun|pip install|ruff) ")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # MODEL, OUT, N
REPO_PATH = re.compile(r"(?:bench|docs|moepress|recipes|tests)/[\w./-]*")
OUTPUT_OPTIONS = ("-o", "--out", "--output")


def commands() -> list[tuple[str, str, bool]]:
    """(where, command, complete) of every command in a ```bash block (complete: every required
    argument given) or a prose `code span` (may name only the command) of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(ROOT)
        for m in SHELL_FENCE.finditer(text):
            first = text.count("\n", 0, m.start()) + 2
            for k, line in enumerate(m.group(1).replace("\\\n", " ").split("\n")):
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append((f"{name}:{first + k}", line.strip(), True))
        prose = ANY_FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keeps the line numbers
        for m in CODE_SPAN.finditer(prose):
            span = " ".join(m.group(1).split())
            if COMMAND.match(span) and m.group(1).count("\n") <= 2:
                found.append((f"{name}:{prose.count(chr(10), 0, m.start()) + 1}", span, False))
    return found


COMMANDS = commands()


def _cli_group():
    import typer

    from moepress.cli import app

    return typer.main.get_command(app)


def check_cli(args: list[str], complete: bool) -> None:
    """`moepress ARGS` as the CLI parses it, without running it."""
    partial = not complete or "..." in args
    args = [a.strip("[]") for a in args if a != "..."]  # `[--json]`: optional; `...`: some left out
    if not args:
        return
    group = _cli_group()
    ctx = group.make_context("moepress", args[:1])
    command = group.get_command(ctx, args[0])
    assert command is not None, f"no command `moepress {args[0]}`"
    options = {o: p for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for a in args[1:]:
        if a.startswith("-") and not a.lstrip("-")[:1].isdigit():
            assert a.split("=")[0] in options, f"`moepress {args[0]}` has no option {a.split('=')[0]}"
    # a placeholder (MODEL, OUT, `--layers N`) stands for a value: "1" parses as a path, a text or a number
    rest = ["1" if PLACEHOLDER.fullmatch(a) else a for a in args[1:]]
    try:
        command.make_context(f"moepress {args[0]}", rest, parent=ctx)
    except Exception as err:
        if not (partial and any(c.__name__ == "MissingParameter" for c in type(err).__mro__)):
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            raise AssertionError(message) from None


def check_script(args: list[str]) -> None:
    """`python SCRIPT ARGS`: the script exists and names every option given."""
    path = ROOT / args[0]
    assert path.is_file(), f"no file {args[0]}"
    source = path.read_text(encoding="utf-8")
    for a in args[1:]:
        if a.startswith("-") and not a.lstrip("-")[:1].isdigit():
            option = a.split("=")[0]
            assert f'"{option}"' in source or f"'{option}'" in source, f"{args[0]} has no option {option}"


def check_command(command: str, complete: bool) -> None:
    tokens = shlex.split(command, comments=True)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]) or tokens[0] == "time":  # `VAR=x`, `time` in front
        tokens = tokens[1:]
    for before, path in zip(["", *tokens], tokens, strict=False):  # what a command reads, not what it writes
        if REPO_PATH.fullmatch(path) and before not in OUTPUT_OPTIONS:
            assert (ROOT / path).exists(), f"no {path} in the repository"
    head = tokens[0]
    if head == "moepress":
        check_cli(tokens[1:], complete)
    elif head == "torchrun":
        at = next(k for k, t in enumerate(tokens) if t == "-m" or t.endswith(".py"))
        if tokens[at] == "-m":
            assert tokens[at + 1] == "moepress", command
            check_cli(tokens[at + 2:], complete)
        else:
            check_script(tokens[at:])
    elif head == "python" and tokens[1:3] == ["-m", "moepress"]:
        check_cli(tokens[3:], complete)
    elif head == "python" and tokens[1:3] == ["-m", "pytest"]:
        for t in tokens[3:]:
            if t.startswith("tests"):
                assert (ROOT / t.split("::")[0]).exists(), f"no {t}"
    elif head == "python":
        check_script(tokens[1:])
    elif head == "pip" and "-e" in tokens:  # the extras named exist
        import tomllib

        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in tokens[tokens.index("-e") + 1:]:
            for extra in re.findall(r"\[([\w,-]+)\]", spec)[0].split(",") if "[" in spec else ():
                assert extra in extras, f"pyproject.toml has no extra {extra!r}"
    # other tools' commands (`pip install vllm`, `ruff check ...`): their paths were checked above


def test_the_pages_have_commands():
    assert sum(where.startswith("CONTRIBUTING.md") for where, _, _ in COMMANDS) >= 5
    assert any(where.startswith("docs/") for where, _, _ in COMMANDS)


@pytest.mark.parametrize("where, command, complete", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_command_parses(where, command, complete):
    try:
        check_command(command, complete)
    except AssertionError as err:
        raise AssertionError(f"{where}: `{command}`: {err}") from None
