"""Original-vs-compressed comparison rows (metric, original, compressed, retained %), shown by the
CLI as a rich table or printed as JSON.

"Retained %" reads the same way for every metric, 100 = nothing lost: compressed/original for
higher-is-better metrics (accuracy, tokens/s, top-1 agreement) and for sizes, original/compressed for
lower-is-better ones (perplexity). Divergences have no meaningful ratio (the original's is 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.table import Table

    from moepress.evaluate.divergence import Divergence
    from moepress.evaluate.lm_eval_bridge import TaskScore
    from moepress.evaluate.perplexity import Perplexity
    from moepress.evaluate.speed import SpeedComparison
    from moepress.evaluate.task_sets import TaskSet

Better = Literal["higher", "lower", "size", "none"]


@dataclass
class ComparisonRow:
    metric: str
    original: float | None
    compressed: float | None
    retained_pct: float | None
    better: Better
    unit: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def retained_pct(original: float | None, compressed: float | None, better: Better) -> float | None:
    if original is None or compressed is None or better == "none":
        return None
    num, den = (original, compressed) if better == "lower" else (compressed, original)
    return 100.0 * num / den if den else None


def row(
    metric: str, original: float | None, compressed: float | None, better: Better, unit: str = ""
) -> ComparisonRow:
    kept = retained_pct(original, compressed, better)
    return ComparisonRow(metric, original, compressed, kept, better, unit)


def comparison_rows(
    *,
    param_bytes: tuple[int | None, int | None] | None = None,
    perplexity: tuple[Perplexity | None, Perplexity | None] | None = None,
    divergence: Divergence | None = None,
    tasks: tuple[Mapping[str, TaskScore] | None, Mapping[str, TaskScore] | None] | None = None,
    task_set: TaskSet | None = None,
    speed: SpeedComparison | None = None,
) -> list[ComparisonRow]:
    """Rows for whatever was measured; each pair is (original, compressed), either side may be None.
    With a `task_set`, its average (each task's metric chosen as the paper does) follows the tasks."""
    rows: list[ComparisonRow] = []
    if param_bytes:
        rows.append(row("parameter bytes", *param_bytes, "size", "bytes"))
    if perplexity:
        o, c = perplexity
        rows.append(row("perplexity", o and o.ppl, c and c.ppl, "lower"))
    if divergence is not None:
        rows.append(row("KL(original‖compressed)", 0.0, divergence.kl, "none", "nats/token"))
        rows.append(row("JS divergence", 0.0, divergence.js, "none", "nats/token"))
        rows.append(row("top-1 agreement", 1.0, divergence.top1_agreement, "higher"))
    if tasks:
        o_scores, c_scores = tasks[0] or {}, tasks[1] or {}
        names = list(dict.fromkeys([*o_scores, *c_scores]))
        for name in names:
            o, c = o_scores.get(name), c_scores.get(name)
            for metric in ("acc", "acc_norm"):
                ov, cv = o and getattr(o, metric), c and getattr(c, metric)
                if ov is not None or cv is not None:
                    rows.append(row(f"{name} {metric}", ov, cv, "higher"))
        if len(names) > 1:
            rows.append(row("mean acc", _mean(o_scores, names), _mean(c_scores, names), "higher"))
        if task_set is not None:
            avg = [task_set.average(s) if s else None for s in (tasks[0], tasks[1])]
            rows.append(row(f"{task_set.name} average (paper's metric per task)", *avg, "higher"))
    if speed is not None:
        o, c = speed.original, speed.compressed
        suffix = " [CPU]" if speed.cpu_timing else ""
        for b in o.prefill_tokens_per_s:
            rows.append(row(f"prefill tok/s (b={b}){suffix}", o.prefill_tokens_per_s[b],
                            c.prefill_tokens_per_s.get(b), "higher", "tokens/s"))
        for b in o.decode_tokens_per_s:
            rows.append(row(f"decode tok/s (b={b}){suffix}", o.decode_tokens_per_s[b],
                            c.decode_tokens_per_s.get(b), "higher", "tokens/s"))
        for b in o.compiled_decode_tokens_per_s:
            rows.append(row(f"compiled decode tok/s (b={b}, {o.compile_mode}){suffix}",
                            o.compiled_decode_tokens_per_s[b], c.compiled_decode_tokens_per_s.get(b), "higher",
                            "tokens/s"))
        gbps = f"{o.bandwidth_bytes_per_s / 1e12:g} TB/s"
        for label, field in (("decode", "bytes_limit_fraction"), ("compiled decode", "compiled_bytes_limit_fraction")):
            for b, share in getattr(o, field).items():
                rows.append(row(f"{label}: share of the bytes-read limit (b={b}, {gbps}){suffix}", share,
                                getattr(c, field).get(b), "none", "fraction"))
        for b, mem in o.peak_memory_bytes.items():
            if mem is not None:
                rows.append(row(f"peak memory (b={b})", mem, c.peak_memory_bytes.get(b), "size", "bytes"))
        rows.append(row("decode bytes read / token", o.decode_bytes_per_token, c.decode_bytes_per_token,
                        "size", "bytes"))
    return rows


def _mean(scores: Mapping[str, TaskScore], names: list[str]) -> float | None:
    accs = [scores[n].acc for n in names if n in scores and scores[n].acc is not None]
    return sum(accs) / len(accs) if len(accs) == len(names) else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB" if value < 2**30 else f"{value / 2**30:,.2f} GiB"
    if unit == "tokens/s":
        return f"{value:,.1f}"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def rows_table(rows: list[ComparisonRow], title: str | None = None) -> Table:
    """A rich table of the rows (for `moepress eval` on a terminal)."""
    from rich.table import Table

    table = Table("metric", "original", "compressed", "retained", title=title)
    for r in rows:
        kept = "–" if r.retained_pct is None else f"{r.retained_pct:.1f}%"
        table.add_row(r.metric, _fmt(r.original, r.unit), _fmt(r.compressed, r.unit), kept)
    return table
