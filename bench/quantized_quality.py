"""Pruning and quantisation side by side on the bundled minis (issue 23, point 4).

For each model, one table: the original (bf16), an expert prune (`--method`, default frequency at
--ratio 0.25), the original quantised (`moepress.quant.export.quantize_folder`, data-free), the prune
quantised on the way out (`moepress compress ... --quantize`), and the quantised original pruned (its
format kept: kept experts copied with their scales). Dev perplexity, JS / top-1 agreement to the
original, 4-way (hellaswag) and 2-way (piqa) accuracy of ../shared/data/tasks, and the bytes of the
weight files as stored. Calibration: calib.txt; evaluation: dev.txt (never the calibration text).

    python bench/quantized_quality.py                               # the three minis, fp8 and w4a16
    python bench/quantized_quality.py --models olmoe-mini --schemes fp8 --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import MODELS, ROOT, SHARED, dev_logits, environment, measure, reference_measure, written_size

import moepress
from moepress.data import load_tokens
from moepress.models.loading import load_model, resolve_device

DEV_SEED = 1
TASKS = ("hellaswag", "piqa")
FULL = dict(n=64, seq_len=256, eval_tokens=32768, eval_len=512, task_limit=None)
QUICK = dict(n=8, seq_len=128, eval_tokens=4096, eval_len=512, task_limit=20)


def cli(*args) -> None:
    """`moepress ARGS` in a subprocess (as a user runs it); its stderr on failure."""
    done = subprocess.run([sys.executable, "-m", "moepress", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"moepress {' '.join(map(str, args))}: {done.stderr.strip()[-400:]}")


def quantized_copy(source: Path, out: Path, scheme: str) -> Path:
    from moepress.quant.export import quantize_folder

    shutil.copytree(source, out)
    quantize_folder(out, scheme)
    return out


def accuracy(model, tokenizer, args, cfg) -> dict:
    from moepress.evaluate.lm_eval_bridge import run_tasks

    scores = run_tasks(model, tokenizer, TASKS, data_dir=args.shared / "data" / "tasks", batch_size=args.batch_size,
                       limit=cfg["task_limit"])
    return {t: {"acc": s.acc, "acc_norm": s.acc_norm, "samples": s.samples} for t, s in scores.items()}


def row(folder: Path, label: str, tokenizer, dev, reference, args, cfg, device, seconds: float) -> dict:
    model = moepress.load(folder, dtype=args.dtype, device=device)
    quality = measure(model, dev, reference, args.batch_size, device)
    quality["tasks"] = accuracy(model, tokenizer, args, cfg)
    _, stored = written_size(folder)
    del model
    return {"variant": label, **quality, "stored_bytes": stored, "seconds": round(seconds, 1)}


def run_model(name: str, args, cfg: dict, device: torch.device, work: Path) -> dict:
    path, data = args.shared / "models" / name, args.shared / "data"
    model, tokenizer = load_model(path, dtype=args.dtype, device=device)
    dev = load_tokens(tokenizer, data / "dev.txt", cfg["eval_tokens"] // cfg["eval_len"], cfg["eval_len"],
                      seed=DEV_SEED).input_ids
    reference = dev_logits(model, dev, args.batch_size, device)
    base = reference_measure(dev, reference, args.batch_size)
    base["tasks"] = accuracy(model, tokenizer, args, cfg)
    del model
    rows = [{"variant": "original (bf16)", **base, "stored_bytes": written_size(path)[1], "seconds": 0.0}]
    calib = ["--data", data / "calib.txt", "-n", cfg["n"], "--seq-len", cfg["seq_len"], "--device", device.type]
    prune = ["--method", args.method, "--ratio", args.ratio]

    def timed(label: str, make) -> None:
        start = time.perf_counter()
        folder = make()
        rows.append(row(folder, label, tokenizer, dev, reference, args, cfg, device, time.perf_counter() - start))
        print(f"  {name}: {label} done", flush=True)

    timed(f"{args.method} {args.ratio}", lambda: (cli("compress", path, *prune, *calib, "-o", work / "prune"),
                                                  work / "prune")[1])
    for scheme in args.schemes:
        timed(f"{scheme}", lambda s=scheme: quantized_copy(path, work / f"q-{s}", s))
        timed(f"{args.method} {args.ratio} → {scheme}",
              lambda s=scheme: (cli("compress", path, *prune, *calib, "--quantize", s, "-o", work / f"pq-{s}"),
                                work / f"pq-{s}")[1])
        timed(f"{scheme} → {args.method} {args.ratio}",
              lambda s=scheme: (cli("compress", work / f"q-{s}", *prune, *calib, "-o", work / f"qp-{s}"),
                                work / f"qp-{s}")[1])
    return {"model": name, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}")
    print("| variant | dev ppl | JS | top-1 | hellaswag acc_n | piqa acc_n | MiB stored |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        tasks = {k.removesuffix("_local"): v for k, v in r.get("tasks", {}).items()}  # local task files' names
        acc = [f"{tasks[t]['acc_norm']:.3f}" if t in tasks else "—" for t in TASKS]
        print(f"| {r['variant']} | {r['ppl']:.2f} | {r['js']:.4f} | {r['top1']:.3f} | {acc[0]} | {acc[1]} "
              f"| {r['stored_bytes'] / 2**20:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--schemes", nargs="+", default=["fp8", "w4a16"])
    ap.add_argument("--method", default="frequency")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, numbers mean nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--eval-tokens", type=int, default=None, help=f"dev tokens (default {FULL['eval_tokens']})")
    ap.add_argument("--task-limit", type=int, default=None, help="items per task (default all)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder holding models/ and data/")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("eval_tokens", "task_limit"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = resolve_device(args.device)
    results = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            result = run_model(name, args, cfg, device, Path(work))
        result.update(config=cfg, method=args.method, ratio=args.ratio, environment=environment(device))
        print_table(result)
        results.append(result)
        tag = "quick" if args.quick else device.type
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"quantized_quality_{name}_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
