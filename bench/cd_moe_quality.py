"""CD-MoE quality benchmark on the bundled mini checkpoints: condensed layers vs dropped layers.

For each checkpoint in ../shared/models: the greedy CD-MoE search with k = 0 (cd-moe-s) and k = 2
(cd-moe-sr) routed experts and the layer-drop baseline, each searched once for N layers (the plan
for n < N layers is the first n greedy steps). For n = 1 … N and each variant, the plan is applied
by surgery to a copy of the model and measured on held-out dev tokens: perplexity, JS divergence
of next-token distributions to the original, checkpoint bytes. Then the best condensed setting at
n = N is fine-tuned (condensed layers only) on calibration text and its dev perplexity re-measured.
Search wall time and layer-forward counts (cached search vs the naive whole-model-per-candidate
search; the naive time is an estimate from the measured cost of one layer-forward) are reported.

    python bench/cd_moe_quality.py --quick              # 2 CPU cores, a few minutes
    python bench/cd_moe_quality.py --device cuda        # full sizes on a GPU

Prints a table and writes bench/results/cd_moe_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import MODELS, ROOT, SHARED, dev_logits, measure

from moepress.data import load_tokens
from moepress.finetune import finetune
from moepress.io.sizes import size_of
from moepress.methods.cd_moe import cd_moe, prefix_plan
from moepress.models import get_adapter
from moepress.models.loading import load_model
from moepress.surgery import apply_plan

QUICK = dict(calib=8, calib_len=128, dev=16, dev_len=256, layers=3, expert_pool=4,
             train_tokens=32 * 4 * 256, train_batch=4, lr=3e-4)
FULL = dict(calib=64, calib_len=256, dev=64, dev_len=512, layers=6, expert_pool=None,
            train_tokens=2_000_000, train_batch=16, lr=1e-4)


def layer_forward_seconds(model, ids, batch_size: int, device) -> float:
    """Seconds of one decoder layer over the calibration set (a whole-model pass / layers)."""
    start = time.perf_counter()
    dev_logits(model, ids, batch_size, device)
    return (time.perf_counter() - start) / len(get_adapter(model).layers(model))


def run_model(
    path: Path, data: Path, cfg: dict, device: torch.device, dtype: str, batch_size: int
) -> dict:
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    calib = load_tokens(tokenizer, data / "calib.txt", cfg["calib"], cfg["calib_len"], seed=0)
    dev = load_tokens(tokenizer, data / "dev.txt", cfg["dev"], cfg["dev_len"], seed=1).input_ids
    n_moe = len(get_adapter(model).moe_layer_ids(model))
    n_layers = min(cfg["layers"], n_moe)
    original_bytes = size_of(model).bytes
    reference = dev_logits(model, dev, batch_size, device)
    base = measure(model, dev, reference, batch_size, device)
    t_layer = layer_forward_seconds(model, calib.input_ids, batch_size, device)
    out: dict = {"original": {**base, "bytes": original_bytes}, "searches": {}, "rows": []}

    variants = {
        "cd-moe-s": dict(experts=0),
        "cd-moe-sr": dict(experts=2, expert_pool=cfg["expert_pool"]),
        "layer-drop": dict(drop=True),
    }
    plans = {}
    for variant, kw in variants.items():
        start = time.perf_counter()
        # the settings its recorded results used (moepress's variant; bench/fidelity.py has the reference's)
        plan = cd_moe(model, calib.input_ids, layers=n_layers, batch_size=batch_size, device=device,
                      metric="vocab-js", weight_mode="all", **kw)
        seconds = time.perf_counter() - start
        fp = plan.metadata["forward_passes"]
        extra = fp["naive_layer_forwards"] - fp["search_layer_forwards"]
        out["searches"][variant] = {
            "seconds": seconds,
            "layer_forwards": fp["search_layer_forwards"],
            "naive_layer_forwards": fp["naive_layer_forwards"],
            "naive_seconds_estimate": seconds + extra * t_layer,
            "metric_evals": fp["metric_evals"],
            "order": plan.metadata["order"],
            "calib_js_curve": plan.metadata["curve"],
            "experts": {i: v["order"] for i, v in plan.metadata["experts"].items()},
        }
        plans[variant] = plan

    compressed_at_n: dict[str, torch.nn.Module] = {}
    for variant, plan in plans.items():
        for n in range(1, n_layers + 1):
            compressed = apply_plan(copy.deepcopy(model), prefix_plan(plan, n))
            row = measure(compressed, dev, reference, batch_size, device)
            nbytes = size_of(compressed).bytes
            out["rows"].append({"variant": variant, "layers": n, **row, "bytes": nbytes,
                                "memory_ratio": nbytes / original_bytes})
            if n == n_layers and variant != "layer-drop":
                compressed_at_n[variant] = compressed
            else:
                del compressed

    best = min(compressed_at_n, key=lambda v: next(
        r["ppl"] for r in out["rows"] if r["variant"] == v and r["layers"] == n_layers))
    train = load_tokens(tokenizer, data / "calib.txt",
                        max(1, cfg["train_tokens"] // cfg["dev_len"]), cfg["dev_len"], seed=2).input_ids
    tuned, result = finetune(
        compressed_at_n[best], prefix_plan(plans[best], n_layers), train, None,
        tokens=cfg["train_tokens"], lr=cfg["lr"], batch_size=cfg["train_batch"], device=device,
        recipe="fast",  # the recipe its recorded results used; the reference recipe is finetune's default
    )
    before = next(r for r in out["rows"] if r["variant"] == best and r["layers"] == n_layers)
    after = measure(tuned, dev, reference, batch_size, device)
    gap = before["ppl"] - base["ppl"]
    out["finetune"] = {
        "variant": best, "layers": n_layers, "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "js_before": before["js"], "js_after": after["js"],
        "recovered": (before["ppl"] - after["ppl"]) / gap if gap > 0 else None,
        "steps": result.steps, "tokens": result.tokens, "trainable_parameters": result.trainable_parameters,
        "seconds": result.seconds, "loss_first": result.losses[0], "loss_last": result.losses[-1],
    }
    return out


def print_table(name: str, r: dict) -> None:
    o = r["original"]
    print(f"\n== {name}: original dev ppl {o['ppl']:.2f}, {o['bytes'] / 2**20:.1f} MiB")
    print(f"{'variant':<11} {'n':>2} {'MiB':>7} {'mem':>6} {'dev ppl':>8} {'dev JS':>8} {'top1':>6}")
    for row in r["rows"]:
        print(f"{row['variant']:<11} {row['layers']:>2} {row['bytes'] / 2**20:>7.1f} "
              f"{row['memory_ratio']:>6.3f} {row['ppl']:>8.2f} {row['js']:>8.4f} {row['top1']:>6.3f}")
    print(f"{'search':<11} {'s':>7} {'layer-fwd':>10} {'naive':>8} {'x':>5} {'naive s (est.)':>15}")
    for v, s in r["searches"].items():
        ratio = s["naive_layer_forwards"] / s["layer_forwards"]
        print(f"{v:<11} {s['seconds']:>7.1f} {s['layer_forwards']:>10} {s['naive_layer_forwards']:>8} "
              f"{ratio:>5.2f} {s['naive_seconds_estimate']:>15.1f}")
    f = r["finetune"]
    rec = "n/a" if f["recovered"] is None else f"{100 * f['recovered']:.0f}%"
    print(f"finetune {f['variant']} n={f['layers']}: dev ppl {f['ppl_before']:.2f} -> {f['ppl_after']:.2f} "
          f"(recovered {rec} of the gap), {f['steps']} steps / {f['tokens']} tokens, {f['seconds']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small calibration/dev sets for 2 CPU cores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="1..N layers (default 3 quick, 6 full)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-tokens", type=int, default=None, help="fine-tuning token budget")
    ap.add_argument("--models-dir", default=str(SHARED / "models"))
    ap.add_argument("--data-dir", default=str(SHARED / "data"), help="holds calib.txt and dev.txt")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cd_moe_quality.json"))
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.layers:
        cfg["layers"] = args.layers
    if args.train_tokens:
        cfg["train_tokens"] = args.train_tokens
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = {"mode": "quick" if args.quick else "full", "device": str(device), "dtype": args.dtype,
               "threads": torch.get_num_threads(), "config": cfg, "models": {}}
    start = time.perf_counter()
    for name in args.models.split(","):
        path, data = Path(args.models_dir) / name, Path(args.data_dir)
        results["models"][name] = run_model(path, data, cfg, device, args.dtype, args.batch_size)
        print_table(name, results["models"][name])
    results["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
