"""Markdown tables for the results in docs/results.md (and the README's headline tables), read from
bench/results/*.json.

The numbers in docs/results.md and the README are pasted from this script's output, so they always trace back to a
results file (which records the command, device and library versions that produced it).

    python bench/readme_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("dsv2-mini", "qwen2moe-mini", "olmoe-mini")
METHOD_ORDER = ("mone", "frequency+novice", "variance", "frequency", "reap", "naee", "random")


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pruning_table() -> str:
    """Dev perplexity (Δ to the original) and JS per method × ratio, one column group per model."""
    runs = {m: _load(f"pruning_quality_{m}_h100.json") for m in MODELS}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return ""
    ratios = sorted({row["ratio"] for r in runs.values() for row in r["models"][next(iter(r["models"]))]["rows"]})
    head = "| method | ratio | " + " | ".join(f"{m} ppl (JS)" for m in runs) + " | bytes kept |"
    lines = [head, "|" + "---|" * (3 + len(runs))]
    orig = " | ".join(f"{r['models'][m]['original']['ppl']:.2f}" for m, r in runs.items())
    lines.append(f"| original | — | {orig} | 100% |")
    for ratio in ratios:
        for method in METHOD_ORDER:
            cells, kept = [], ""
            for m, r in runs.items():
                row = next((x for x in r["models"][m]["rows"] if x["method"] == method and x["ratio"] == ratio), None)
                if row is None:
                    cells.append("—")
                    continue
                cells.append(f"{row['ppl']:.2f} ({row['js']:.4f})")
                kept = kept or f"{100 * row['bytes_ratio']:.1f}%"
            lines.append(f"| {method} | {ratio:g} | " + " | ".join(cells) + f" | {kept} |")
    return "\n".join(lines)


MERGING_ORDER = ("mone", "frequency", "reap", "m-smoe", "ream", "hc-smoe")


#: the merging run of issue 24: every router row kept (the merges' default) beside the representative's row
MERGING2_ORDER = ("mone", "frequency", "random", "reap", "m-smoe", "m-smoe@router=representative", "ream",
                  "ream@router=representative", "hc-smoe", "hc-smoe@router=representative")


def merging2_table() -> str:
    """Both merge router modes beside pruning: `pruning_quality_<model>_merging2_<where>.json`."""
    runs = {}
    for m in MODELS:
        found = sorted(RESULTS.glob(f"pruning_quality_{m}_merging2_*.json"))
        if not found:
            continue
        runs[m] = json.loads(found[-1].read_text())
        # rows the run left out (device time) from the earlier merging run on the same calibration and dev
        # tokens, where that run's method computed the same thing (its merges kept the representative's row)
        earlier = _load(f"pruning_quality_{m}_merging_h200.json")
        rows = runs[m]["models"][m]["rows"]
        have = {(x["method"], x["ratio"]) for x in rows}
        for x in (earlier or {}).get("models", {}).get(m, {}).get("rows", []):
            name = EARLIER_NAMES.get(x["method"])
            if name and (name, x["ratio"]) not in have:
                rows.append({**x, "method": name})
    return merging_table(runs, MERGING2_ORDER) if runs else ""


#: the earlier merging run's method names in this one's terms (hc-smoe then used cosine distance: not reused)
EARLIER_NAMES = {"mone": "mone", "frequency": "frequency", "reap": "reap",
                 "m-smoe": "m-smoe@router=representative", "ream": "ream@router=representative"}


def merging_table(runs: dict | None = None, order: tuple[str, ...] | None = None) -> str:
    """Merging beside pruning on 1 × H200: dev ppl (JS) and HellaSwag / PIQA acc_norm per model."""
    if runs is None:
        runs = {m: _load(f"pruning_quality_{m}_merging_h200.json") for m in MODELS}
        runs = {m: r for m, r in runs.items() if r}
    order = order or MERGING_ORDER
    if not runs:
        return ""

    def acc(row: dict) -> str:
        tasks = row.get("tasks") or {}
        return "/".join(f"{tasks[t]['acc_norm']:.3f}" for t in ("hellaswag_local", "piqa_local") if t in tasks)

    head = "| method | ratio | " + " | ".join(f"{m} ppl (JS) | {m} acc" for m in runs) + " | bytes kept |"
    lines = [head, "|" + "---|" * (3 + 2 * len(runs))]
    orig = " | ".join(f"{r['models'][m]['original']['ppl']:.2f} | {acc(r['models'][m]['original'])}"
                      for m, r in runs.items())
    lines.append(f"| original | — | {orig} | 100% |")
    for ratio in sorted({row["ratio"] for r in runs.values() for m in r["models"] for row in r["models"][m]["rows"]}):
        for method in order:
            cells, kept = [], []
            for m, r in runs.items():
                row = next((x for x in r["models"][m]["rows"] if x["method"] == method and x["ratio"] == ratio), None)
                if row is None:
                    cells.append("— | —")
                    continue
                cells.append(f"{row['ppl']:.2f} ({row['js']:.4f}) | {acc(row)}")
                kept.append(100 * row["bytes_ratio"])
            span = f"{min(kept):.1f}–{max(kept):.1f}%" if kept else "—"
            lines.append(f"| {method} | {ratio:g} | " + " | ".join(cells) + f" | {span} |")
    return "\n".join(lines)


def cd_moe_table() -> str:
    """Per model: dev ppl of n condensed (S, SR k=2) vs dropped layers, bytes share, fine-tuning."""
    out = []
    for m in MODELS:
        r = _load(f"cd_moe_quality_{m}_h100.json")
        if not r:
            continue
        res = r["models"][m]
        rows = {(x["variant"], x["layers"]): x for x in res["rows"]}
        n_max = max(n for _, n in rows)
        out.append(f"**{m}** (original dev ppl {res['original']['ppl']:.2f})\n")
        out.append("| layers | CD-MoE-S ppl / JS / bytes | CD-MoE-SR (k=2) ppl / JS / bytes "
                   "| layer drop ppl / JS / bytes |")
        out.append("|---|---|---|---|")
        for n in range(1, n_max + 1):
            cells = []
            for v in ("cd-moe-s", "cd-moe-sr", "layer-drop"):
                x = rows.get((v, n))
                cells.append(f"{x['ppl']:.2f} / {x['js']:.4f} / {100 * x['memory_ratio']:.1f}%" if x else "—")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        ft = res.get("finetune")
        if ft:
            out.append(
                f"\nFine-tuning the {ft['layers']} condensed layers of {ft['variant']} only "
                f"({ft['trainable_parameters']:,} parameters, {ft['tokens']:,} calibration tokens, "
                f"{ft['seconds']:.0f} s): "
                f"dev ppl {ft['ppl_before']:.2f} → {ft['ppl_after']:.2f}, JS {ft['js_before']:.4f} → "
                f"{ft['js_after']:.4f} ({100 * ft['recovered']:.0f}% of the perplexity gap recovered).\n"
            )
        search = res["searches"]
        out.append("| search | wall s | layer-forwards | naive layer-forwards | naive s (est.) |")
        out.append("|---|---|---|---|---|")
        for v, s in search.items():
            out.append(f"| {v} | {s['seconds']:.1f} | {s['layer_forwards']} | {s['naive_layer_forwards']} | "
                       f"{s['naive_seconds_estimate']:.0f} |")
        out.append("")
    return "\n".join(out)


def speed_table() -> str:
    lines = ["| model | variant | bytes | decode ×, b=1 | decode ×, b=32 | bytes-read limit × | prefill ×, b=1 | "
             "prefill ×, b=32 | decode tok/s b=1 / b=32 |", "|" + "---|" * 9]
    for model in ("dsv2-lite", "qwen1.5-moe"):
        r = _load(f"speed_{model}_h100.json")
        if not r:
            continue
        for name, v in r["variants"].items():
            c, s = v["vs_original"], v["speed"]
            d = s["decode_tokens_per_s"]
            lines.append(
                f"| {model} | {name} | {100 * c['bytes_ratio']:.1f}% ({s['param_bytes']['total'] / 2**30:.1f} GiB) | "
                f"{c['decode_speedup']['1']:.2f} | {c['decode_speedup']['32']:.2f} | "
                f"{c['decode_bytes_limit_speedup']:.2f} | {c['prefill_speedup']['1']:.2f} | "
                f"{c['prefill_speedup']['32']:.2f} | {d['1']:.1f} / {d['32']:.0f} |"
            )
    return "\n".join(lines)


def scale_table() -> str:
    lines = ["| run | model bf16 | largest layer | activations (1 batch) | peak GPU | peak / (layer + act.) | "
             "calibration tokens | wall s | disk wait s |", "|" + "---|" * 9]
    for name in sorted(RESULTS.glob("scale_*.json")):
        r = json.loads(name.read_text())
        gib = 2**30
        ratio = r.get("peak_over_layer_plus_activations")  # absent in runs that only timed calibration
        act = f"{r['batch_activation_bytes'] / gib:.2f} GiB" if ratio else "—"
        lines.append(
            f"| {r['shape']} on {r['gpus']} × {r['device'].replace('NVIDIA ', '')} ({r['store_dtype']} on disk) | "
            f"{r['model_bf16_bytes'] / gib:.1f} GiB | {r['largest_layer_bf16_bytes'] / gib:.2f} GiB | "
            f"{act} | {r['peak_gpu_bytes'] / gib:.2f} GiB | {f'{ratio:.2f}' if ratio else '—'} | "
            f"{r['calibration_tokens']:,} | {r['calibration_wall_s']:.1f} | {r.get('read_wait_s', 0):.1f} |"
        )
    return "\n".join(lines)


CALIBRATION_ROWS = (  # (results file, path, what the row is)
    ("n256", "per_expert", "before: statistics per expert in a Python loop (`stats_path=\"per_expert\"`)"),
    ("n256", "hooked", "grouped statistics beside the model's own block (`\"hooked\"`)"),
    ("n1024", "forward", "the model's own forward, no statistics"),
    ("n1024", "fused", "**after: fused** (default), batch 32 sequences"),
    ("n1024_b64", "fused", "**after: fused**, batch 64 sequences"),
    ("n64_host_unpinned", "fused", "fused, hidden states kept on the host (`moepress calibrate`'s default), "
     "synchronous pageable copies"),
    ("n256_host", "fused", "fused, hidden states on the host, pinned buffers copied while the next batch runs"),
)


def calibration_table() -> str:
    lines = ["| path | tokens | median s (min–max) | tokens/s | TFLOP/s | share of peak |", "|" + "---|" * 6]
    for tag, path, label in CALIBRATION_ROWS:
        r = _load(f"calibration_throughput_dsv2-lite_NVIDIA_H200_{tag}.json")
        if not r or path not in r["paths"]:
            continue
        row = r["paths"][path]
        bold = "**" if "after" in label else ""
        lines.append(
            f"| {label} | {r['tokens']:,} | {row['median_s']:.2f} ({row['min_s']:.2f}–{row['max_s']:.2f}) | "
            f"{row['tokens_per_s']:,.0f} | {row['achieved_tflops']:.1f} | "
            f"{bold}{100 * row['fraction_of_peak']:.1f}%{bold} |"
        )
    return "\n".join(lines)


def decode_compiled_table() -> str:
    r = _load("decode_compiled_dsv2-lite_h200.json")
    if not r:
        return ""
    lines = ["| variant | b | read/step | limit tok/s | eager tok/s (min–max) | compiled tok/s (min–max) | "
             "eager % of limit | compiled % of limit | compile s |", "|" + "---|" * 9]
    for variant, entry in r["variants"].items():
        for b, s in entry["summary"].items():
            (elo, ehi), (lo, hi) = s["eager_tok_s_range"], s["compiled_tok_s_range"]
            lines.append(
                f"| {variant} | {b} | {s['bytes_per_step'] / 2**30:.2f} GiB | {s['limit_tok_s']:,.0f} | "
                f"{s['eager_tok_s']:,.1f} ({elo:,.1f}–{ehi:,.1f}) | {s['compiled_tok_s']:,.1f} ({lo:,.1f}–{hi:,.1f}) | "
                f"{100 * s['eager_share_of_limit']:.0f}% | {100 * s['compiled_share_of_limit']:.0f}% | "
                f"{s['compile_s']:.0f} |"
            )
    return "\n".join(lines)


def _fidelity_cell(row: dict | None) -> str:
    """ppl / JS / hellaswag acc_norm / piqa acc_norm (— where not measured)."""
    if row is None:
        return "—"
    t = row.get("tasks") or {}
    acc = [t.get(k, {}).get("acc_norm") for k in ("hellaswag_local", "piqa_local")]
    accs = " / ".join("—" if a is None else f"{a:.3f}" for a in acc)
    return f"{row['ppl']:.2f} / {row['js']:.4f} / {accs}"


def fidelity_table() -> str:
    """Reference default vs moepress's variant per method and setting, one column per model."""
    runs = {m: _load(f"fidelity_{m}.json") for m in MODELS}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return ""
    head = "| method | setting | bytes | " + " | ".join(f"{m}: ppl / JS / hs / piqa" for m in runs) + " |"
    lines = [head, "|" + "---|" * (3 + len(runs))]
    cells = " | ".join(_fidelity_cell({**r["original"], "js": 0.0}) for r in runs.values())
    lines.append(f"| original | — | 100% | {cells} |")
    first = next(iter(runs.values()))
    keys = []
    for row in first["rows"]:
        key = (row["family"], row["variant"], row.get("ratio", row.get("layers")))
        if key not in keys:
            keys.append(key)
    variants = list(dict.fromkeys(k[1] for k in keys))
    keys.sort(key=lambda k: (k[0] != "mone", k[2], variants.index(k[1])))
    for family, variant, setting in keys:
        found = {m: next((x for x in r["rows"] if (x["family"], x["variant"],
                                                    x.get("ratio", x.get("layers"))) == (family, variant, setting)),
                         None) for m, r in runs.items()}
        ratios = [f"{x['bytes_ratio']:.1%}" for x in found.values() if x]
        what = f"{setting:.0%} pruned" if family == "mone" else f"{setting} layers"
        cells = " | ".join(_fidelity_cell(x) for x in found.values())
        lines.append(f"| {variant} | {what} | {'–'.join(dict.fromkeys(ratios))} | {cells} |")
    return "\n".join(lines)


def quantized_table() -> str:
    """Pruning and quantising side by side (`bench/quantized_quality.py`): one row per model and variant."""
    runs = []
    for m in MODELS:
        found = sorted(RESULTS.glob(f"quantized_quality_{m}_*.json"))
        if found and "quick" not in found[-1].name:
            runs.append(json.loads(found[-1].read_text()))
    if not runs:
        return ""
    lines = ["| model | variant | dev ppl | JS | HellaSwag / PIQA acc_norm | MiB stored | bytes kept |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in runs:
        base = r["rows"][0]["stored_bytes"]
        for row in r["rows"]:
            tasks = {k.removesuffix("_local"): v for k, v in row.get("tasks", {}).items()}
            acc = "/".join(f"{tasks[t]['acc_norm']:.2f}" for t in ("hellaswag", "piqa") if t in tasks) or "—"
            lines.append(f"| {r['model']} | {row['variant']} | {row['ppl']:.2f} | {row['js']:.4f} | {acc} "
                         f"| {row['stored_bytes'] / 2**20:.1f} | {100 * row['stored_bytes'] / base:.0f}% |")
    return "\n".join(lines)


def _acc(evaluation: dict) -> str:
    tasks = evaluation.get("tasks", {})
    return " | ".join(f"{tasks[t]['acc']:.3f} / {tasks[t]['acc_norm']:.3f}" if t in tasks else "—"
                      for t in ("hellaswag", "piqa"))


def finetune_table(gpu: str = "h200") -> str:
    """CD-MoE fine-tuning recipes (`bench/finetune_quality.py`): per model the original, the CD-MoE-SR output
    before fine-tuning, and each recipe after its LM and SFT stages, with the share of the perplexity gap
    to the original recovered after each stage."""
    lines = ["| model | variant | LM / SFT steps | train s | dev ppl: LM stage → + SFT stage "
             "| gap recovered: LM → + SFT | hellaswag acc / acc_norm | piqa acc / acc_norm |",
             "|---|---|---|---:|---|---|---|---|"]
    found = False
    for m in MODELS:
        run, orig = _load(f"finetune_quality_{m}_{gpu}.json"), _load(f"finetune_quality_{m}_original_{gpu}.json")
        if not run or not run.get("complete"):
            continue
        found = True
        before = run["before"]
        base = run.get("original", {}).get("ppl") or (orig or {}).get("before", {}).get("ppl")
        if orig:
            lines.append(f"| {m} | original | — | — | {orig['before']['ppl']:.2f} | — | {_acc(orig['before'])} |")
        layers = ",".join(map(str, run["plan"]["condensed"]))
        lines.append(f"| {m} | CD-MoE-SR, layers {layers} condensed | — | — | {before['ppl']:.2f} | 0% "
                     f"| {_acc(before)} |")
        gap = before["ppl"] - base if base else None

        def share(ppl: float, start: float = before["ppl"], gap: float | None = gap) -> str:
            return f"{100 * (start - ppl) / gap:.0f}%" if gap else "—"

        for name, r in run["recipes"].items():
            lines.append(f"| {m} | {name} (lr {r['recipe']['lr']:g}) | {r['lm_steps']} / {r['sft_steps']} "
                         f"| {r['train_seconds']:.1f} | {r['ppl_after_lm']:.2f} → {r['after']['ppl']:.2f} "
                         f"| {share(r['ppl_after_lm'])} → {share(r['after']['ppl'])} | {_acc(r['after'])} |")
    return "\n".join(lines) if found else ""


def calibrated_quant_table() -> str:
    """Round-to-nearest against calibrated int4 (`bench/calibrated_quant.py`), one row per model and scheme."""
    lines = ["| model | scheme | dev ppl | JS to the float prune | logits' distance | MiB stored | quantising s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    found = False
    for m in MODELS:
        for path in sorted(RESULTS.glob(f"calibrated_quant_{m}_*.json")):
            r = json.loads(path.read_text())
            found = True
            where = path.stem.rsplit("_", 1)[1]
            for row in r["rows"]:
                if "error" in row:
                    continue
                seconds = "—" if row["seconds"] is None else f"{row['seconds']:.0f} ({where})"
                lines.append(f"| {m} {r['method']} {r['ratio']:g} | {row['scheme']} | {row['ppl']:.2f} "
                             f"| {row['js']:.5f} | {row['logit_distance']:.4f} | {row['stored_bytes'] / 2**20:.1f} "
                             f"| {seconds} |")
    return "\n".join(lines) if found else ""


def main() -> None:
    for title, table in (("reproducing the papers", fidelity_table()), ("expert pruning", pruning_table()),
                         ("merging", merging_table()), ("merging, both router modes", merging2_table()),
                         ("CD-MoE", cd_moe_table()), ("speed", speed_table()),
                         ("compiled decode", decode_compiled_table()), ("calibration throughput", calibration_table()),
                         ("scale", scale_table()), ("pruning and quantising", quantized_table()),
                         ("CD-MoE fine-tuning recipes", finetune_table()),
                         ("calibrated int4", calibrated_quant_table())):
        print(f"### {title}\n\n{table}\n")


if __name__ == "__main__":
    main()
