"""One call that evaluates a compressed model against its original, for `moepress eval` and notebooks:
size, perplexity, divergence of next-token distributions, zero-shot tasks, optionally speed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.evaluate.divergence import divergence as divergence_of
from moepress.evaluate.perplexity import default_window, perplexity
from moepress.evaluate.report_table import comparison_rows
from moepress.evaluate.speed import compare_speed, param_bytes
from moepress.evaluate.task_sets import TaskSet, missing_task_data
from moepress.evaluate.task_sets import task_set as task_set_named


def evaluate_pair(
    compressed: nn.Module,
    original: nn.Module | None,
    tokenizer,
    ppl_ids: torch.Tensor | None = None,
    tasks: Sequence[str] | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    divergence: bool = True,
    task_data: str | Path | Mapping[str, str | Path] | None = None,
    task_limit: int | None = None,
    task_set: str | TaskSet | None = None,
    include_path: str | Path | None = None,
    speed: bool = False,
    speed_kwargs: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluate `compressed` (and `original`, when given) and return a JSON-ready dict.

    `ppl_ids` (e.g. from `load_eval_ids`) drive perplexity and, with an original, the KL/JS/top-1
    comparison on the same windows. `tasks` go through lm-eval (`task_data`: a folder of
    `<task>.jsonl` files or a {task: path} mapping). `task_set` (`cd-moe`, `mone`) adds that paper's
    tasks and its average, each task's metric chosen as the paper does (`moepress.evaluate.task_sets`).
    `speed` measures both models in this process.
    Keys: rows (the comparison table), param_bytes, perplexity, divergence, tasks, task_set, speed; a key
    is None when that part was not asked for.
    """
    tset = task_set_named(task_set) if isinstance(task_set, str) else task_set
    if tset is not None:
        tasks = list(dict.fromkeys([*tset.tasks, *(tasks or [])]))
    if ppl_ids is None and not tasks and not speed and original is None:
        raise MoepressError(
            "nothing to evaluate; give perplexity text, tasks, or an original model to compare"
        )
    models = {"original": original, "compressed": compressed}
    out: dict[str, Any] = {"param_bytes": _each(models, lambda m: param_bytes(m)["total"])}

    ppl = None
    if ppl_ids is not None:
        window = window or default_window(compressed)
        ppl = _each(models, lambda m: perplexity(m, ppl_ids, window=window, stride=stride,
                                                 batch_size=batch_size, max_tokens=max_tokens))
    out["perplexity"] = None if ppl is None else {k: v and asdict(v) for k, v in ppl.items()}

    div = None
    if divergence and original is not None and ppl_ids is not None:
        div = divergence_of(original, compressed, ppl_ids, window=window, batch_size=batch_size,
                            max_tokens=max_tokens)
    out["divergence"] = None if div is None else asdict(div)

    scores = None
    if tasks:
        from moepress.evaluate.lm_eval_bridge import run_tasks

        if not isinstance(task_data, Mapping):
            missing_task_data(list(tasks), task_data)  # every missing file in one error, before any scoring

        files, folder = (task_data, None) if isinstance(task_data, Mapping) else (None, task_data)
        scores = _each(models, lambda m: run_tasks(m, tokenizer, tasks, data_files=files, data_dir=folder,
                                                   include_path=include_path, batch_size=batch_size,
                                                   limit=task_limit))
    out["tasks"] = None if scores is None else {
        k: v and {t: s.to_dict() for t, s in v.items()} for k, v in scores.items()
    }
    out["task_set"] = None if tset is None or scores is None else {
        **tset.to_dict(), "average": {k: v and tset.average(v) for k, v in scores.items()}
    }

    cmp = None
    if speed:
        if original is None:
            raise MoepressError("speed ratios need the original model; pass --against MODEL")
        cmp = compare_speed(original, compressed, **(speed_kwargs or {}))
    out["speed"] = None if cmp is None else cmp.to_dict()

    rows = comparison_rows(
        param_bytes=(out["param_bytes"]["original"], out["param_bytes"]["compressed"]),
        perplexity=None if ppl is None else (ppl["original"], ppl["compressed"]),
        divergence=div,
        tasks=None if scores is None else (scores["original"], scores["compressed"]),
        task_set=tset,
        speed=cmp,
    )
    out["rows"] = [r.to_dict() for r in rows]
    return out


def _each(models: dict[str, nn.Module | None], fn: Callable[[nn.Module], Any]) -> dict[str, Any]:
    """fn over the original and the compressed model; None for a model that is absent."""
    return {k: None if m is None else fn(m) for k, m in models.items()}
