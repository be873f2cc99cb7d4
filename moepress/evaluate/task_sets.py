"""The zero-shot task sets of the papers moepress reproduces, and their average computed the paper's way.

Both papers score with lm-evaluation-harness, 0-shot.
- MoNE (`mone`) averages 9 numbers: acc_norm for arc_challenge, arc_easy, openbookqa and piqa; acc for
  boolq, copa, mmlu, rte and winogrande.
- CD-MoE (`cd-moe`) reports arc_challenge, boolq, piqa, rte, openbookqa, winogrande, mmlu and hellaswag
  but does not say which metric it takes; we use MoNE's choice per task (acc_norm for the ARC sets,
  openbookqa, piqa and hellaswag; acc for the rest), so the two sets' numbers are comparable.
mmlu is our local task: the mean over all rows of one jsonl (see tasks/mmlu_local.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moepress.errors import MoepressError

if TYPE_CHECKING:
    from moepress.evaluate.lm_eval_bridge import TaskScore

Metric = Literal["acc", "acc_norm"]


@dataclass(frozen=True)
class TaskSet:
    """A paper's tasks, each with the metric that paper averages."""

    name: str
    paper: str
    metrics: Mapping[str, Metric]  # task base name -> metric, in the paper's order

    @property
    def tasks(self) -> list[str]:
        return list(self.metrics)

    def average(self, scores: Mapping[str, TaskScore]) -> float | None:
        """Mean of each task's paper metric; None unless every task has it. `scores` is keyed by lm-eval
        task name (`piqa_local`) or base name (`piqa`)."""
        values = []
        for task, metric in self.metrics.items():
            score = scores.get(f"{task}_local") or scores.get(task)
            value = score and getattr(score, metric)
            if value is None:
                return None
            values.append(value)
        return sum(values) / len(values)

    def metric_summary(self) -> str:
        """`acc_norm: arc_challenge, piqa; acc: boolq, ...`: which metric each task contributes."""
        by_metric: dict[str, list[str]] = {}
        for task, metric in self.metrics.items():
            by_metric.setdefault(metric, []).append(task)
        return "; ".join(f"{m}: {', '.join(ts)}" for m, ts in sorted(by_metric.items(), reverse=True))

    def to_dict(self) -> dict:
        return {"name": self.name, "paper": self.paper, "metrics": dict(self.metrics)}


TASK_SETS: dict[str, TaskSet] = {
    "cd-moe": TaskSet(
        "cd-moe",
        "CD-MoE (Condense, Don't Just Prune, 2024)",
        {
            "arc_challenge": "acc_norm", "boolq": "acc", "piqa": "acc_norm", "rte": "acc",
            "openbookqa": "acc_norm", "winogrande": "acc", "mmlu": "acc", "hellaswag": "acc_norm",
        },
    ),
    "mone": TaskSet(
        "mone",
        "MoNE (Replacing Redundant Experts with Lightweight Novices)",
        {
            "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "copa": "acc",
            "mmlu": "acc", "openbookqa": "acc_norm", "piqa": "acc_norm", "rte": "acc", "winogrande": "acc",
        },
    ),
}


def task_set(name: str) -> TaskSet:
    """The task set called `name` (`cd-moe` or `mone`)."""
    key = name.strip().lower().replace("_", "-")
    if key not in TASK_SETS:
        raise MoepressError(f"unknown task set {name!r}; use one of {', '.join(TASK_SETS)}")
    return TASK_SETS[key]


def missing_task_data(tasks: list[str], data_dir: str | Path | None) -> None:
    """Raise one error naming every local task's jsonl that is not in `data_dir` (or $MOEPRESS_TASK_DATA),
    so a long run does not stop at the fifth task; lm-eval's own task names are not checked."""
    from moepress.evaluate.lm_eval_bridge import DATA_ENV, local_tasks

    shipped = set(local_tasks())
    local = [t.removesuffix("_local") for t in tasks if t.removesuffix("_local") in shipped]
    if not local:
        return
    folder = data_dir or os.environ.get(DATA_ENV)
    if not folder:
        raise MoepressError(
            f"tasks {', '.join(local)} read local jsonl files; pass --task-data DIR holding "
            f"{', '.join(f'{t}.jsonl' for t in local)} (or set {DATA_ENV}=DIR)"
        )
    missing = [f"{t}.jsonl" for t in local if not (Path(folder) / f"{t}.jsonl").is_file()]
    if missing:
        raise MoepressError(
            f"missing in {folder}: {', '.join(missing)}; export those datasets to jsonl there "
            "(row format: first lines of moepress/evaluate/tasks/<task>_local.yaml)"
        )
