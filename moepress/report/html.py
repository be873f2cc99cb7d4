"""The report page: one self-contained HTML file (inline CSS, figures as data URIs, no scripts, no
external resources); every piece of text from the folder is escaped. A section whose data is
absent says so in one line."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from html import escape
from typing import Any

from moepress.io.manifest import moepress_version
from moepress.io.save import PLAN_FILE
from moepress.plan import Condense, Drop, Keep, Prune
from moepress.report import plots
from moepress.report.collect import EVAL_FILE, STATS_DIR, ReportData, quality_points, run_name

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em;
       color: #1d232a; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccd; padding-bottom: .2em;
       margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #d5d9de;
       padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f3f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1.2em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; }
p.na { color: #6b7580; font-style: italic; } code { background: #f3f4f6; padding: 0 .25em; }
tr.keep td { color: #6b7580; } .prune { color: #9a4d00; } .condense { color: #0b5e9e; }
.drop { color: #a3192b; } .small { font-size: .9em; color: #555f6a; }
"""


def render(data: ReportData) -> str:
    """The whole page for `data`."""
    body = [
        _header(data),
        _section("plan", "Plan, layer by layer", _plan_table(data)),
        _section("experts", "Expert statistics", _heatmaps(data)),
        _section("search", "Layer search", _search(data)),
        _section("bytes", "Bytes by component", _bytes(data)),
        _section("quality", "Quality", _quality(data)),
    ]
    if data.notes:
        body.append(_section("notes", "Notes", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in data.notes)
                             + "</ul>"))
    title = f"moepress report: {run_name(data.out.resolve())}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---- pieces ------------------------------------------------------------------------------------------
def _section(ident: str, title: str, inner: str) -> str:
    return f'<section id="{ident}">\n<h2>{escape(title)}</h2>\n{inner}\n</section>'


def _na(what: str) -> str:
    return f'<p class="na">Not available: {escape(what)}</p>'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _table(header: list[str], rows: list[list[Any]], row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = []
    for k, row in enumerate(rows):
        cls = f' class="{escape(row_class[k])}"' if row_class else ""
        cells = "".join(
            f'<td class="num">{escape(_fmt(c))}</td>' if _numeric(c) else f"<td>{escape(_fmt(c))}</td>"
            for c in row
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>"


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def _ids(ids: list[int]) -> str:
    """Expert ids as ranges: [0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8'."""
    out, ids = [], sorted(ids)
    k = 0
    while k < len(ids):
        j = k
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[k]) if j == k else f"{ids[k]}–{ids[j]}")
        k = j + 1
    return ", ".join(out) or "none"


def _header(data: ReportData) -> str:
    plan, m = data.plan, data.manifest
    source = data.source_model or "unknown (not recorded)"
    fingerprint = (m.source_fingerprint if m else None) or plan.model_fingerprint
    rows = [
        ("output", str(data.out)),
        ("source model", source + (f" (fingerprint {fingerprint})" if fingerprint else "")),
        ("method", plan.method),
        ("layers changed", ", ".join(f"{n} {a}" for a, n in sorted(plan.summary().items())) or "none"),
    ]
    if m is not None:
        rows.append(("checkpoint", "plain architecture (loads with no custom code)" if m.plain_architecture
                     else "custom structure (modeling_moepress.py, trust_remote_code=True or moepress.load)"))
    if data.stats is not None:
        meta = data.stats.meta
        seqs, seq_len = meta.get("num_sequences"), meta.get("seq_len")
        shape = f", {seqs}×{seq_len} tokens" if seqs and seq_len else ""
        rows.append(("calibration", f"{meta.get('data', 'unknown data')}{shape} ({data.stats_source})"))
    if plan.data_fingerprint:
        rows.append(("plan data fingerprint", plan.data_fingerprint))
    made_with = m.moepress_version if m else None
    version = moepress_version()
    if made_with and made_with != version:
        made_with = f"{made_with} (report by {version})"
    rows.append(("moepress version", made_with or version))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    written = datetime.fromtimestamp((data.out / PLAN_FILE).stat().st_mtime, timezone.utc)
    rows.append(("date", f"report {now}; output written {written.strftime('%Y-%m-%d %H:%M UTC')}"))
    items = "\n".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    hp = plan.hyperparameters
    hp_html = (_table(["hyperparameter", "value"], [[k, _json(v)] for k, v in sorted(hp.items())]) if hp
               else _na("the plan records no hyperparameters"))
    return (f"<header>\n<h1>moepress report: {escape(run_name(data.out.resolve()))}</h1>\n"
            f'<dl class="meta">\n{items}\n</dl>\n<h3>Hyperparameters</h3>\n{hp_html}\n</header>')


def _json(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _plan_table(data: ReportData) -> str:
    plan, stats = data.plan, data.stats
    moe = set(stats.layers) if stats is not None else set()
    n = data.num_layers
    layers = sorted(set(range(n or 0)) | set(plan.layers) | moe)
    rows, classes = [], []
    recorded = plan.metadata.get("pruned") if isinstance(plan.metadata.get("pruned"), dict) else {}
    for i in layers:
        a = plan.layers.get(i)
        experts = stats[i].num_experts if i in moe else None
        if a is None or isinstance(a, Keep):
            dense = stats is not None and i not in moe
            rows.append([i, "dense (not MoE)" if dense else "keep", "all", "", "", ""])
        elif isinstance(a, Prune):
            of = f" of {experts}" if experts else ""
            gone = sorted(set(range(experts)) - set(a.keep_experts) - set(a.novices)) if experts else None
            if gone is None and isinstance(recorded.get(str(i)), list):  # expert-pruning methods record it
                gone = sorted(set(recorded[str(i)]) - set(a.novices))
            note = "novices output their mean calibration output × router weight" if a.novices else ""
            if a.merges:  # the removed experts live on, averaged into a kept one
                note = "; ".join(f"{r} = merge of {_ids(m.members)}" for r, m in a.merges.items())
            rows.append([i, "prune", f"{len(a.keep_experts)}{of}: {_ids(a.keep_experts)}",
                         _ids(a.novices) if a.novices else "none", "?" if gone is None else _ids(gone), note])
        elif isinstance(a, Condense):
            weights = ", ".join(f"{e}: {w:.4g}" for e, w in zip(a.experts, a.weights, strict=True))
            rows.append([i, "condense", _ids(a.experts), "", "router and all other experts",
                         f"dense MLP = {'shared experts + ' if a.keep_shared else ''}Σ w·expert; "
                         f"weights {weights or 'none'}"])
        elif isinstance(a, Drop):
            rows.append([i, "drop", "none", "", "whole MLP", "residual only"])
        classes.append(rows[-1][1].split()[0])
    note = "" if n else _na("the layer count (config.json); layers not in the plan are not listed")
    header = ["layer", "action", "routed experts kept", "novices", "removed", "detail"]
    return note + _table(header, rows, classes)


def _heatmaps(data: ReportData) -> str:
    if data.stats is None or not data.stats.layers:
        return _na(f"no calibration statistics (looked for {STATS_DIR}/ in the output; pass --stats DIR)")
    caption = (f'<p class="small">From {escape(str(data.stats_source))}: the original model on the '
               "calibration tokens. Marks show the plan: × removed, ○ novice, ★ expert kept in a condensed "
               "layer; hatched rows are condensed or dropped layers.</p>")
    figs = [_img(plots.expert_heatmap(data.stats, data.plan, f), plots.HEATMAP_FIELDS[f][0])
            for f in plots.HEATMAP_FIELDS]
    return caption + "\n".join(figs)


def _search(data: ReportData) -> str:
    current = data.runs[0]
    uri = plots.search_curves(data.runs)
    if uri is None:
        return _na(f"the plan ({data.plan.method}) records no greedy layer-search curve "
                   "(CD-MoE and layer-drop plans do)")
    others = sorted({r.method for r in data.runs[1:] if r.curve is not None and r.metric == current.metric}
                    - {current.method})
    extra = f" Also shown from the runs beside this one: {', '.join(others)}." if others else ""
    metric = {"js": "JS divergence", "kl": "KL divergence", "ppl": "perplexity"}.get(current.metric or "", "")
    return (f'<p class="small">The {escape(metric or str(current.metric))} of the model with the first n '
            "layers changed, in the order the greedy search chose them (CD-MoE's Figure 2)."
            f"{escape(extra)}</p>\n"
            + _img(uri, "layer search curve"))


def _bytes(data: ReportData) -> str:
    m = data.manifest
    if m is None or not m.bytes_before:
        return _na("no moepress_manifest.json in the output")
    names = [c for c in m.bytes_before if c != "total"]
    names += [c for c in m.bytes_after if c not in m.bytes_before and c != "total"]
    if "total" in m.bytes_before or "total" in m.bytes_after:
        names.append("total")
    rows = []
    for c in names:
        b, a = m.bytes_before.get(c, 0), m.bytes_after.get(c, 0)
        rows.append([c, m.params_before.get(c), m.params_after.get(c), b, a,
                     f"{100 * (a / b - 1):+.1f}%" if b else "new"])
    return _img(plots.bytes_bars(m.bytes_before, m.bytes_after), "bytes by component") + "\n" + _table(
        ["component", "parameters before", "parameters after", "bytes before", "bytes after", "change"], rows)


def _quality(data: ReportData) -> str:
    parts = []
    ev = data.eval
    if ev is not None and ev.get("rows"):
        rows = [[r.get("metric"), r.get("original"), r.get("compressed"),
                 None if r.get("retained_pct") is None else f"{r['retained_pct']:.1f}%", r.get("unit", "")]
                for r in ev["rows"] if isinstance(r, dict)]
        parts.append(_table(["metric", "original", "compressed", "retained", "unit"], rows))
    else:
        parts.append(_na(f"this output has no {EVAL_FILE} (run `moepress eval`)"))
    found = quality_points(data.runs)
    if found is None:
        parts.append(_na(f"no evaluated run in {data.out.resolve().parent} to compare"))
    else:
        label, points = found
        n = sum(not p.original for p in points)
        parts.append(f'<p class="small">Every folder beside this one with a {EVAL_FILE} ({n} run'
                     f"{'s' if n != 1 else ''}), labelled by folder, coloured by method; the original model "
                     "as a star. Perplexities compare only when measured on the same text.</p>")
        parts.append(_img(plots.quality_scatter(label, points), "quality against bytes"))
    return "\n".join(parts)
