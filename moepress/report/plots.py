"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state)
and returned as `data:image/png;base64,...` URIs so the page embeds them."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from moepress.calibrate.stats import CalibrationStats
from moepress.plan import CompressionPlan, Condense, Drop, Prune
from moepress.report.collect import Point, Run, run_name

HEATMAP_FIELDS = {
    "frequency": ("expert access frequency (share of routed slots)", "viridis"),
    "output_variance": ("expert output variance (mean over hidden dims)", "magma"),
}
CURVE_LABELS = {
    "js": "JS divergence to the original (nats/token)",
    "kl": "KL(original ‖ compressed) (nats/token)",
    "ppl": "perplexity on the calibration tokens",
}


def to_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def byte_unit(n: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return scale, unit
    return 1, "B"


# what the plan did to an expert (or a layer): its scatter style and its legend label
_MARKS = {
    "removed": (dict(marker="x", color="red", s=28, linewidths=1.4), "removed"),
    "novice": (dict(marker="o", facecolors="none", edgecolors="cyan", s=34, linewidths=1.4), "novice"),
    "kept": (dict(marker="*", color="white", edgecolors="black", s=70, linewidths=0.6),
             "kept in condensed layer"),
    "hatched": ({}, "condensed / dropped layer"),
}


def _legend_entry(name: str) -> Line2D | Patch:
    style, label = _MARKS[name]
    if name == "hatched":
        return Patch(facecolor="#777777", hatch="///", edgecolor="white", label=label)
    face = style.get("facecolors", style.get("color"))
    edge = style.get("edgecolors", style.get("color"))
    return Line2D([], [], ls="", marker=style["marker"], mfc=face, mec=edge, ms=8, label=label)


def _ticks(n: int, most: int) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(0, n, step))


def expert_heatmap(stats: CalibrationStats, plan: CompressionPlan, field: str) -> str:
    """Layers × experts of one statistic (MoNE's Figure 1b view), with what the plan did on top:
    × removed, ○ novice, ★ kept in a condensed layer; condensed and dropped rows hatched."""
    title, cmap = HEATMAP_FIELDS[field]
    ids = sorted(stats.layers)
    width = max(stats[i].num_experts for i in ids)
    values = np.full((len(ids), width), np.nan)
    for r, i in enumerate(ids):
        v = getattr(stats[i], field).double().numpy()
        values[r, : len(v)] = v

    positive = values[np.isfinite(values) & (values > 0)]
    norm: Normalize | None = None
    if positive.size and positive.max() / positive.min() > 100:  # variance spans decades: log colour
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        values = np.where(values > 0, values, np.nan)  # zero (never routed) shown as "bad" grey

    size = (max(7.0, min(4 + 0.16 * width, 14)), min(2.2 + 0.26 * len(ids), 16))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps[cmap].with_extremes(bad="#d0d0d0")
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01)

    marks: dict[str, list[tuple[int, int]]] = {name: [] for name in _MARKS}
    for r, i in enumerate(ids):
        a = plan.layers.get(i)
        n = stats[i].num_experts
        if isinstance(a, Prune):
            marks["removed"] += [(e, r) for e in sorted(set(range(n)) - set(a.keep_experts) - set(a.novices))]
            marks["novice"] += [(e, r) for e in a.novices]
        elif isinstance(a, (Condense, Drop)):
            ax.add_patch(Rectangle((-0.5, r - 0.5), n, 1, fill=False, hatch="///", edgecolor="white", lw=0))
            marks["hatched"].append((0, r))
            marks["kept"] += [(e, r) for e in getattr(a, "experts", [])]
    handles = []
    for name, xy in marks.items():
        if not xy:
            continue
        if name != "hatched":
            ax.scatter([x for x, _ in xy], [y for _, y in xy], **_MARKS[name][0])
        handles.append(_legend_entry(name))

    ax.set_title(title)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(_ticks(width, 32))
    rows = _ticks(len(ids), 40)
    ax.set_yticks(rows, [str(ids[r]) for r in rows])
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small",
                   frameon=False)
    return to_data_uri(fig)


def search_curves(runs: Sequence[Run]) -> str | None:
    """The greedy layer search's metric after each step (CD-MoE's Figure 2): this run and every run
    beside it searched with the same metric (e.g. the layer-drop baseline), longest run per method."""
    current = runs[0]
    if current.curve is None:
        return None
    best: dict[str, Run] = {current.method: current}
    for r in runs[1:]:
        if r.curve is None or r.metric != current.metric:
            continue
        other = best.get(r.method)
        if other is None or (other is not current and len(r.curve) > len(other.curve)):
            best[r.method] = r
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in sorted(best.values(), key=lambda r: r is not current):
        steps = np.arange(1, len(r.curve) + 1)
        label = f"{r.method} ({run_name(r.path)})"
        ax.plot(steps, r.curve, marker="o", lw=2.2 if r is current else 1.4, label=label,
                zorder=3 if r is current else 2)
        if r is current and r.order:
            for x, y, layer in zip(steps, r.curve, r.order, strict=False):
                ax.annotate(f"L{layer}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize="x-small")
    ax.set_xlabel("MoE layers changed (greedy order)")
    ax.set_ylabel(CURVE_LABELS.get(current.metric or "", current.metric or "metric"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return to_data_uri(fig)


def bytes_bars(before: dict[str, int], after: dict[str, int]) -> str:
    """Bytes by component before and after (the total is in the title and the table)."""
    names = [c for c in before if c != "total"] + [c for c in after if c not in before and c != "total"]
    b = np.array([before.get(c, 0) for c in names], dtype=float)
    a = np.array([after.get(c, 0) for c in names], dtype=float)
    scale, unit = byte_unit(max(b.max(initial=0), a.max(initial=0)))
    fig = Figure(figsize=(8, 1.4 + 0.45 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y - 0.2, b / scale, height=0.4, label="before", color="#9aa5b1")
    ax.barh(y + 0.2, a / scale, height=0.4, label="after", color="#2a7ab0")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    tb, ta = before.get("total", int(b.sum())), after.get("total", int(a.sum()))
    tscale, tunit = byte_unit(tb)
    ax.set_title(f"total {tb / tscale:,.2f} → {ta / tscale:,.2f} {tunit} ({ta / tb:.1%} of the original)"
                 if tb else "bytes by component")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def quality_scatter(label: str, points: Sequence[Point]) -> str:
    """Quality against checkpoint bytes for every evaluated run of the parent folder and the original."""
    scale, unit = byte_unit(max(p.bytes for p in points))
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    methods = sorted({p.method for p in points if not p.original})
    colours = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    for m in methods:
        ps = [p for p in points if p.method == m and not p.original]
        ax.scatter([p.bytes / scale for p in ps], [p.value for p in ps], color=colours[m], label=m, s=40,
                   zorder=3)
    current = [p for p in points if p.current]
    if current:
        ax.scatter([p.bytes / scale for p in current], [p.value for p in current], s=180, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="this run", zorder=4)
    orig = [p for p in points if p.original]
    if orig:
        ax.scatter([p.bytes / scale for p in orig], [p.value for p in orig], marker="*", s=160, color="black",
                   label="original", zorder=4)
    for p in points:
        ax.annotate(p.label, (p.bytes / scale, p.value), textcoords="offset points", xytext=(5, 4),
                    fontsize="x-small")
    ax.set_xlabel(f"parameter bytes ({unit})")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return to_data_uri(fig)
