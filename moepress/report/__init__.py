"""`moepress report`: one self-contained HTML page of what a compression did — expert statistics
with the plan on top, the layer-search curve, the plan, bytes by component, and quality against
bytes for every run beside it."""

from __future__ import annotations

import os
from pathlib import Path

from moepress.report.collect import EVAL_FILE, REPORT_FILE, STATS_DIR, ReportData, collect

__all__ = ["EVAL_FILE", "REPORT_FILE", "STATS_DIR", "ReportData", "collect", "render_report", "write_report"]


def render_report(out: Path, *, stats_dir: Path | None = None) -> str:
    """The report page of the output folder `out` as an HTML string."""
    from moepress.report.html import render

    return render(collect(out, stats_dir))


def write_report(out: Path, *, stats_dir: Path | None = None, dest: Path | None = None) -> Path:
    """Write the report of the output folder `out` to `dest` (default OUT/report.html) and return it.

    Reads OUT/moepress_plan.json (required), moepress_manifest.json, config.json, moepress_eval.json,
    the statistics in `stats_dir` (default OUT/moepress_stats/), and the plans and evaluations of the
    folders beside OUT; raises MoepressError when OUT is not a moepress output.
    """
    from moepress.atomic import check_output_file

    if dest is not None:  # before any work: a file in the way ends in one line, not a traceback
        check_output_file(dest, overwrite=True, what="report file", example=REPORT_FILE, make_parents=True)
    page = render_report(Path(out), stats_dir=stats_dir)
    dest = Path(dest) if dest is not None else Path(out) / REPORT_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, dest)  # a reader never sees half a page
    return dest
