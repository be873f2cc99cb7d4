"""Everything a report shows, read from a moepress output folder (and its sibling runs) into one
typed object; a part that is absent is None and its section says so."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moepress.calibrate.stats import CalibrationStats
from moepress.errors import MoepressError
from moepress.io.manifest import MANIFEST_FILE, Manifest
from moepress.io.save import PLAN_FILE
from moepress.plan import CompressionPlan

REPORT_FILE = "report.html"
STATS_DIR = "moepress_stats"  # calibration statistics `compress` keeps next to the weights
EVAL_FILE = "moepress_eval.json"  # the dict `evaluate.pair.evaluate_pair` returns
_TEMPORARY = re.compile(r"\.(tmp|old)-[0-9a-f]{8}$")  # `moepress.atomic.atomic_dir`'s work folders


@dataclass
class Run:
    """One output folder of the parent: what the comparison plots need from it."""

    path: Path
    method: str
    eval: dict[str, Any] | None = None
    metric: str | None = None  # of the greedy layer search, when the plan records one
    curve: list[float] | None = None
    order: list[int] | None = None


@dataclass
class ReportData:
    """What one report shows: the output folder's files, parsed; None where a file is absent."""

    out: Path
    plan: CompressionPlan
    manifest: Manifest | None
    stats: CalibrationStats | None
    stats_source: Path | None
    eval: dict[str, Any] | None
    config: dict[str, Any] | None
    runs: list[Run] = field(default_factory=list)  # every folder beside `out` (itself included)
    notes: list[str] = field(default_factory=list)  # files found but unreadable

    @property
    def num_layers(self) -> int | None:
        cfg = self.config or {}
        n = cfg.get("num_hidden_layers", (cfg.get("text_config") or {}).get("num_hidden_layers"))
        return n if isinstance(n, int) else None

    @property
    def source_model(self) -> str | None:
        if self.manifest is not None and self.manifest.source_path:
            return self.manifest.source_path
        if self.stats is not None and self.stats.meta.get("model"):
            return str(self.stats.meta["model"])
        return None


def collect(out: str | Path, stats_dir: str | Path | None = None) -> ReportData:
    """Read `out` (a folder `moepress apply`/`compress` wrote) and the runs beside it."""
    out = Path(out)
    if not (out / PLAN_FILE).is_file():
        raise MoepressError(
            f"{out} is not a moepress output (no {PLAN_FILE}); give a folder written by "
            "`moepress compress` or `moepress apply`"
        )
    notes: list[str] = []
    plan = CompressionPlan.load(out / PLAN_FILE)

    manifest = None
    if (out / MANIFEST_FILE).is_file():
        try:
            manifest = Manifest.model_validate_json((out / MANIFEST_FILE).read_text())
        except ValueError as err:
            notes.append(f"{MANIFEST_FILE} is unreadable: {str(err).splitlines()[0]}")

    # statistics the user names must load; the folder's own copy is optional
    stats, stats_source = None, None
    if stats_dir is not None:
        stats_source = Path(stats_dir)
        stats = CalibrationStats.load(stats_source)
    elif (out / STATS_DIR / "stats.json").is_file():
        stats_source = out / STATS_DIR
        try:
            stats = CalibrationStats.load(stats_source)
        except (MoepressError, OSError, ValueError, KeyError) as err:
            notes.append(f"{STATS_DIR}/ is unreadable: {err}")
            stats_source = None

    config = _json(out / "config.json", notes)
    ev = _json(out / EVAL_FILE, notes)
    return ReportData(
        out=out, plan=plan, manifest=manifest, stats=stats, stats_source=stats_source, eval=ev,
        config=config, runs=sibling_runs(out, plan, ev), notes=notes,
    )


def sibling_runs(out: Path, plan: CompressionPlan, ev: dict[str, Any] | None) -> list[Run]:
    """Every moepress output in `out`'s parent folder, `out` first; unreadable ones and the temporary
    folders of a write in progress (`moepress.atomic`) are skipped."""
    here = out.resolve()
    runs = [_run(here, plan.method, plan.metadata, ev)]
    try:
        folders = sorted(p for p in here.parent.iterdir() if p.is_dir())
    except OSError:
        return runs
    for d in folders:
        try:
            skip = d == here or _TEMPORARY.search(d.name) or d.name == run_name(here)
            if skip or not (d / PLAN_FILE).is_file():
                continue
            raw = _json(d / PLAN_FILE, [])
            if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
                continue
            run_ev = _json(d / EVAL_FILE, [])
        except OSError:  # a folder we may not read is not ours to report
            continue
        runs.append(_run(d, raw["method"], raw.get("metadata") or {}, run_ev))
    return runs


def run_name(path: Path) -> str:
    """The folder's name, without the suffix of `atomic_dir`'s temporary folder (a report written
    before the rename names the run it will become)."""
    return _TEMPORARY.sub("", path.name)


def _run(path: Path, method: str, meta: dict[str, Any], ev: Any) -> Run:
    curve = meta.get("curve")
    ok = isinstance(curve, list) and len(curve) > 0 and all(isinstance(v, (int, float)) for v in curve)
    order = meta.get("order") if ok and isinstance(meta.get("order"), list) else None
    return Run(
        path=path, method=method, eval=ev if isinstance(ev, dict) else None,
        metric=str(meta.get("metric", "js")) if ok else None,
        curve=[float(v) for v in curve] if ok else None, order=order,
    )


def _json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():  # OSError other than "absent" (permissions) reaches the caller
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} is unreadable: {err}")
        return None


@dataclass
class Point:
    """One model on the quality-vs-bytes plot."""

    label: str
    method: str
    bytes: int
    value: float
    original: bool = False
    current: bool = False


QUALITY = {  # eval key -> (field, axis label), in order of preference
    "perplexity": ("ppl", "perplexity (lower is better)"),
    "divergence": ("js", "JS divergence to the original, nats/token (lower is better)"),
}


def quality_points(runs: list[Run]) -> tuple[str, list[Point]] | None:
    """Compressed size against quality for every evaluated run (`runs[0]` is the current one), plus
    the original model once per distinct (bytes, value); perplexity when any run measured it, else
    JS divergence (the original's is 0)."""
    for key, (fld, label) in QUALITY.items():
        points: list[Point] = []
        originals: set[tuple[int, float]] = set()
        for r in runs:
            if r.eval is None:
                continue
            pb = r.eval.get("param_bytes") or {}
            value = _value(r.eval, key, "compressed", fld)
            if value is not None and isinstance(pb.get("compressed"), int):
                current = r is runs[0]
                points.append(Point(run_name(r.path), r.method, pb["compressed"], value, current=current))
            orig = _value(r.eval, key, "original", fld)
            if orig is not None and isinstance(pb.get("original"), int):
                originals.add((pb["original"], round(orig, 9)))
        if any(not p.original for p in points):
            points += [Point("original", "original", b, v, original=True) for b, v in sorted(originals)]
            return label, points
    return None


def _value(ev: dict[str, Any], key: str, which: str, fld: str) -> float | None:
    part = ev.get(key)
    if key == "divergence":  # only the compressed model has one; the original's is 0 by definition
        if not isinstance(part, dict):
            return None
        part = {"compressed": part, "original": {fld: 0.0}}
    v = (part or {}).get(which)
    v = v.get(fld) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) else None
