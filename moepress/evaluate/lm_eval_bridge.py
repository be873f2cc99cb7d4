"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on an in-memory model.

The model goes in as `HFLM(pretrained=model, ...)`, so compressed custom modules are what gets
scored (an lm-eval `LM` instance is used as it is). Tasks named `arc_challenge`, `arc_easy`, `boolq`,
`copa`, `hellaswag`, `mmlu`, `openbookqa`, `piqa`, `rte`, `winogrande` (or with a `_local` suffix)
use the definitions shipped in `moepress/evaluate/tasks/`, each mirroring lm-eval's own task of that
name, and read a user-provided jsonl in the Hugging Face dataset's row layout: given
per task in `data_files`, or found as `<dir>/<task>.jsonl` in `data_dir` or in the directory named
by $MOEPRESS_TASK_DATA. Any other name goes to lm-eval unchanged (its own task; may need network).

lm-eval's YAML has no variable substitution, so each run writes a two-line task file into a
temporary directory that `include:`s the shipped definition and names the data file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from moepress.errors import MoepressError

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_ENV = "MOEPRESS_TASK_DATA"
INSTALL_HINT = "install the eval extra: pip install -e '.[eval]'"


@dataclass
class TaskScore:
    """Accuracy of one task (None where lm-eval did not report the metric)."""

    task: str
    acc: float | None
    acc_norm: float | None
    acc_stderr: float | None
    acc_norm_stderr: float | None
    samples: int | None
    data: str | None  # local file scored, None for lm-eval's own tasks

    def to_dict(self) -> dict:
        return asdict(self)


def local_tasks() -> list[str]:
    """Base names of the shipped local task definitions (`piqa` for `piqa_local.yaml`, ...)."""
    return sorted(p.stem.removesuffix("_local") for p in TASKS_DIR.glob("*_local.yaml"))


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MoepressError(INSTALL_HINT) from None
    return HFLM, TaskManager


def unknown_tasks_message(unknown: Sequence[str]) -> str:
    """One line naming the unknown tasks and where the known ones are listed."""
    return (
        f"unknown task(s) {', '.join(unknown)}; local tasks (with --task-data DIR): {', '.join(local_tasks())}; "
        "lm-eval's own tasks are listed by `lm-eval ls tasks`"
    )


def check_task_names(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Raise one MoepressError naming every task that is neither a shipped local task nor known to lm-eval
    (nor in `include_path`), before any model is loaded; names that are all local need no lm-eval index."""
    shipped = set(local_tasks())
    others = [t for t in tasks if t.removesuffix("_local") not in shipped]
    if not others:
        return
    _, TaskManager = _require_lm_eval()
    manager = TaskManager(include_path=[str(include_path)] if include_path else None)
    unknown = [t for t in others if t not in manager.all_tasks]
    if unknown:
        raise MoepressError(unknown_tasks_message(unknown))


def _data_file(base: str, data_files: Mapping[str, str | Path], data_dir: str | Path | None) -> Path:
    explicit = data_files.get(base) or data_files.get(f"{base}_local")
    if explicit is not None:
        path = Path(explicit)
    else:
        folder = data_dir or os.environ.get(DATA_ENV)
        if not folder:
            raise MoepressError(
                f"task {base} reads a local jsonl: pass data_files={{'{base}': PATH}} or data_dir=DIR "
                f"holding {base}.jsonl, or set {DATA_ENV}=DIR "
                f"(row format: moepress/evaluate/tasks/{base}_local.yaml)"
            )
        path = Path(folder) / f"{base}.jsonl"
    if not path.is_file():
        raise MoepressError(
            f"task {base}: data file {path} does not exist; export the dataset's validation split to jsonl "
            f"(row format: moepress/evaluate/tasks/{base}_local.yaml)"
        )
    return path.resolve()


def write_task_files(
    tasks: Sequence[str],
    folder: Path,
    data_files: Mapping[str, str | Path] | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Path | None]:
    """Write one task file per local task into `folder`; return lm-eval task name -> data file.

    Names that are not shipped local tasks map to None and are left to lm-eval.
    """
    shipped = set(local_tasks())
    out: dict[str, Path | None] = {}
    for name in tasks:
        base = name.removesuffix("_local")
        if base not in shipped:
            out[name] = None
            continue
        data = _data_file(base, data_files or {}, data_dir)
        task = f"{base}_local"
        spec = {
            "include": str((TASKS_DIR / f"{task}.yaml").resolve()),
            "task": task,
            "dataset_kwargs": {"data_files": {"validation": str(data)}},
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        out[task] = data
    return out


def _metric(res: Mapping, name: str) -> float | None:
    for key in (f"{name},none", name):
        value = res.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    data_files: Mapping[str, str | Path] | None = None,
    data_dir: str | Path | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
) -> dict[str, TaskScore]:
    """Zero-shot (by default) accuracy of an in-memory model on `tasks`, keyed by lm-eval task name.

    `model` is a transformers model (scored through lm-eval's HFLM with `tokenizer`) or an lm-eval `LM`.
    `include_path` adds the user's own task YAML folder. `limit` caps examples per task (quick runs).
    """
    if not tasks:
        raise MoepressError("no tasks given; name at least one, e.g. piqa or hellaswag")
    HFLM, TaskManager = _require_lm_eval()
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="moepress_tasks_") as tmp:
        resolved = write_task_files(tasks, Path(tmp), data_files, data_dir)
        includes = [tmp] + ([str(include_path)] if include_path else [])
        # indexing lm-eval's own ~10k task files takes seconds; skip it when every task is local
        own = {} if any(d is None for d in resolved.values()) else {"include_defaults": False}
        manager = TaskManager(include_path=includes, **own)
        unknown = [t for t in resolved if t not in manager.all_tasks]
        if unknown:
            raise MoepressError(unknown_tasks_message(unknown))
        from lm_eval.api.model import LM

        lm = model if isinstance(model, LM) else HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(resolved),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,  # acc has a closed-form stderr; 0 would drop it
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results = out["results"] if out else {}
    n_samples = (out or {}).get("n-samples", {})
    scores: dict[str, TaskScore] = {}
    for task, data in resolved.items():
        res = results.get(task, {})
        n = n_samples.get(task, {})
        scores[task] = TaskScore(
            task=task,
            acc=_metric(res, "acc"),
            acc_norm=_metric(res, "acc_norm"),
            acc_stderr=_metric(res, "acc_stderr"),
            acc_norm_stderr=_metric(res, "acc_norm_stderr"),
            samples=n.get("effective") if isinstance(n, dict) else None,
            data=str(data) if data else None,
        )
    return scores
