"""Evaluation of compressed models against their originals: perplexity, KL/JS divergence,
zero-shot tasks through lm-evaluation-harness (optional `eval` extra) with the papers' task sets, memory
and speed."""

from moepress.evaluate.divergence import (
    Divergence,
    divergence,
    divergence_from_logits,
    js_divergence_from_logits,
    kl_divergence_from_logits,
)
from moepress.evaluate.pair import evaluate_pair
from moepress.evaluate.perplexity import Perplexity, load_eval_ids, perplexity
from moepress.evaluate.report_table import ComparisonRow, comparison_rows, rows_table
from moepress.evaluate.speed import (
    SpeedComparison,
    SpeedResult,
    compare_speed,
    decode_bytes_per_token,
    measure_speed,
    param_bytes,
    speed_ratios,
)
from moepress.evaluate.task_sets import TASK_SETS, TaskSet, task_set

__all__ = [
    "ComparisonRow",
    "Divergence",
    "Perplexity",
    "SpeedComparison",
    "SpeedResult",
    "TASK_SETS",
    "TaskSet",
    "compare_speed",
    "comparison_rows",
    "decode_bytes_per_token",
    "divergence",
    "divergence_from_logits",
    "evaluate_pair",
    "js_divergence_from_logits",
    "kl_divergence_from_logits",
    "load_eval_ids",
    "measure_speed",
    "param_bytes",
    "perplexity",
    "rows_table",
    "speed_ratios",
    "task_set",
]
