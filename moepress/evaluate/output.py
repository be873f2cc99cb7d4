"""Evaluate or benchmark a written output folder against its original (`moepress eval`, `moepress bench`),
and keep the results next to the weights (`moepress_eval.json`, `moepress_bench.json`) for the report."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moepress.errors import MoepressError

EVAL_FILE = "moepress_eval.json"
BENCH_FILE = "moepress_bench.json"
# Small enough for a CPU to finish in seconds; CPU timings only say whether something is badly off.
CPU_SPEED = {"batch_sizes": (1,), "prompt_len": 64, "new_tokens": 8, "warmup": 1, "repeats": 2}
GPU_SPEED = {"batch_sizes": (1, 32), "prompt_len": 512, "new_tokens": 64, "warmup": 1, "repeats": 3}


def write_json_into(folder: str | Path, name: str, data: Any) -> Path | None:
    """Write `data` as `folder/name` atomically (temporary file, then rename); None when `folder` is
    not a folder this process may write to (results are still printed)."""
    folder = Path(folder)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return None
    dest = folder / name
    tmp = folder / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, dest)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return dest


def _load_pair(out: str | Path, against: str | Path | None, device: str, dtype: str, trust_remote_code: bool,
               allow_pickle: bool = False):
    from moepress.models.loading import load_model

    if against is not None and Path(against).exists() and Path(out).resolve() == Path(against).resolve():
        raise MoepressError(f"--against {against} is the output itself; give the original model")
    compressed, tokenizer = load_model(out, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    original = None
    if against is not None:
        original, _ = load_model(against, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                 allow_pickle=allow_pickle)
    return compressed, original, tokenizer


def evaluate_output(
    out: str | Path,
    against: str | Path | None = None,
    ppl: str | Path | None = None,
    tasks: Sequence[str] = (),
    *,
    task_data: str | Path | None = None,
    task_limit: int | None = None,
    task_set: str | None = None,
    max_tokens: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    write: bool = True,
) -> tuple[dict, Path | None]:
    """`evaluate_pair` on the folder `out` (and the original `against`): perplexity on the text file
    `ppl`, divergence to the original on the same windows, zero-shot `tasks` (local jsonl in
    `task_data`) and a paper's whole `task_set` (`cd-moe`, `mone`) with its average. Every local task's
    jsonl is checked before a model loads. Returns the result dict (its `rows` are the comparison table)
    and where it was written (`out/moepress_eval.json`, or None when `out` cannot be written)."""
    from moepress.evaluate.pair import evaluate_pair
    from moepress.evaluate.perplexity import load_eval_ids
    from moepress.evaluate.task_sets import missing_task_data
    from moepress.evaluate.task_sets import task_set as task_set_named

    tasks = [t.strip() for t in tasks if t.strip()]
    tset = None if task_set is None else task_set_named(task_set)
    if ppl is None and not tasks and tset is None and against is None:
        raise MoepressError(
            "nothing to evaluate; give --ppl FILE, --tasks T1,T2, --task-set cd-moe|mone or --against MODEL"
        )
    for name, value, least in (("--batch-size", batch_size, 1), ("--max-tokens", max_tokens, 2),
                               ("--limit", task_limit, 1)):
        if value is not None and value < least:  # before the models load: one line, not a traceback
            raise MoepressError(f"{name} must be at least {least} (got {value})")
    if ppl is not None and not Path(ppl).is_file():
        raise MoepressError(f"perplexity text {ppl} does not exist; pass a .txt/.jsonl/.parquet file")
    if task_data is not None and not Path(task_data).is_dir():
        raise MoepressError(f"--task-data {task_data} is not a folder; it holds <task>.jsonl files")
    missing_task_data([*(tset.tasks if tset else []), *tasks], task_data)
    if tasks:  # an unknown name fails here, in one line, not after the models have loaded
        from moepress.evaluate.lm_eval_bridge import check_task_names

        check_task_names(tasks)
    compressed, original, tokenizer = _load_pair(out, against, device, dtype, trust_remote_code, allow_pickle)
    ppl_ids = None if ppl is None else load_eval_ids(tokenizer, ppl, max_tokens=max_tokens)
    result = evaluate_pair(
        compressed, original, tokenizer, ppl_ids, tasks, window=window, max_tokens=max_tokens,
        batch_size=batch_size, task_data=task_data, task_limit=task_limit, task_set=tset,
    )
    result["inputs"] = {
        "model": str(out), "against": None if against is None else str(against),
        "ppl": None if ppl is None else str(ppl), "tasks": tasks, "task_set": task_set,
        "task_data": None if task_data is None else str(task_data), "task_limit": task_limit,
        "max_tokens": max_tokens, "window": window,
        "device": str(next(compressed.parameters()).device),
        "dtype": str(next(compressed.parameters()).dtype).removeprefix("torch."),
    }
    if not write:
        return result, None
    written = write_json_into(out, EVAL_FILE, result)
    if written is not None:  # a moepress output's model card gets the table (the rest of the card is kept)
        from moepress.io.model_card import update_card_eval

        update_card_eval(out, result)
    return result, written


def bench_output(
    out: str | Path,
    against: str | Path,
    *,
    batch_sizes: Sequence[int] | None = None,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    repeats: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    write: bool = True,
    compile_mode: str | None = None,
    bandwidth: float | None = None,
):
    """Prefill/decode speed, memory and bytes of `out` against `against`, in this process on one
    device. Sizes default to small ones on CPU (where timings say little) and serving-like ones on a
    GPU. `compile_mode` (e.g. "reduce-overhead") adds compiled static-cache decoding; `bandwidth`
    (bytes/s, default H200's) sets the bytes-read limit. Returns (SpeedComparison, comparison rows,
    where the JSON was written or None)."""
    from moepress.evaluate.report_table import comparison_rows
    from moepress.evaluate.speed import compare_speed

    for name, value in (("batch sizes", min(batch_sizes or [1])), ("prompt length", prompt_len),
                        ("new tokens", new_tokens), ("repeats", repeats)):
        if value is not None and value < 1:  # before the models load: one line, no loading output
            raise MoepressError(f"{name} must be positive (got {value})")
    compressed, original, _ = _load_pair(out, against, device, dtype, trust_remote_code, allow_pickle)
    cpu = next(compressed.parameters()).device.type != "cuda"
    kwargs = dict(CPU_SPEED if cpu else GPU_SPEED)
    for key, value in (("batch_sizes", batch_sizes), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                       ("repeats", repeats)):
        if value is not None:
            kwargs[key] = tuple(value) if key == "batch_sizes" else value
    if compile_mode is not None:
        kwargs["compile_mode"] = compile_mode
    if bandwidth is not None:
        kwargs["bandwidth"] = bandwidth
    if any(b < 1 for b in kwargs["batch_sizes"]):
        raise MoepressError(f"batch sizes must be positive (got {list(kwargs['batch_sizes'])})")
    cmp = compare_speed(original, compressed, **kwargs)
    rows = comparison_rows(
        param_bytes=(cmp.original.param_bytes["total"], cmp.compressed.param_bytes["total"]), speed=cmp
    )
    data = {**cmp.to_dict(), "rows": [r.to_dict() for r in rows], "against": str(against)}
    return cmp, rows, write_json_into(out, BENCH_FILE, data) if write else None
