"""Reproducing the papers: each method's reference-code default beside moepress's variant, on the
bundled mini checkpoints — dev perplexity, JS divergence of next-token distributions to the
original, multiple-choice accuracy (lm-eval on ../shared/data/tasks: hellaswag.jsonl 4-way,
piqa.jsonl 2-way), and checkpoint bytes.

- MoNE at 25% and 50% of routed experts pruned per layer: `mone` (reference: gate-weight mean ×
  sqrt(trace Cov), per-layer allocation, novices) vs `mone --hp ranking=mse` (ours: count frequency ×
  trace Cov, each normalised by its layer max), and the paper's baseline `rs` (routing score, global
  threshold, experts removed). Statistics from 128 × 512 packed windows of calibration text.
- CD-MoE-SR with k = the model's top-k routed experts, 2 / 4 / 6 condensed layers (the first n steps
  of one 6-layer greedy search): reference (hidden-dimension JS, weights averaged over routed tokens,
  100 BOS-first documents of 256 tokens) vs moepress's next-token metric with the same weights
  (`metric=vocab-js`) and with weights averaged over all tokens (`metric=vocab-js weight_mode=all`).

    python bench/fidelity.py --models dsv2-mini --device cuda            # one model per call
    python bench/fidelity.py --quick                                     # CPU smoke run, minutes

Writes bench/results/fidelity_<model>.json (printed by bench/readme_tables.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import MODELS, ROOT, SHARED, dev_logits, environment, measure, reference_measure

from moepress.calibrate import calibrate
from moepress.data import load_documents, load_tokens
from moepress.evaluate.lm_eval_bridge import run_tasks
from moepress.io.sizes import predict_size, size_of
from moepress.methods.base import get_method
from moepress.methods.cd_moe import cd_moe, prefix_plan
from moepress.models.loading import load_model
from moepress.surgery import apply_plan

FULL = dict(stats_n=128, stats_len=512, docs=100, doc_len=256, dev_rows=128, dev_len=512, layers=6,
            steps=(2, 4, 6), ratios=(0.25, 0.5), limit=None)
QUICK = dict(stats_n=8, stats_len=128, docs=8, doc_len=64, dev_rows=8, dev_len=128, layers=2,
             steps=(1, 2), ratios=(0.25,), limit=20)
MONE_VARIANTS = {"mone (reference)": ("mone", {}), "mone --hp ranking=mse": ("mone", {"ranking": "mse"}),
                 "rs (paper's baseline)": ("rs", {})}
CD_VARIANTS = {
    "cd-moe-sr (reference)": {},
    "cd-moe-sr --hp metric=vocab-js": {"metric": "vocab-js"},
    "cd-moe-sr --hp metric=vocab-js weight_mode=all": {"metric": "vocab-js", "weight_mode": "all"},
}
TASKS = ("hellaswag", "piqa")


TASK_ERRORS: list[str] = []


def accuracy(model, tokenizer, tasks_dir: Path, limit: int | None, batch_size: int) -> dict:
    if tasks_dir is None or not (tasks_dir / "hellaswag.jsonl").is_file() or TASK_ERRORS:
        return {}
    try:
        scores = run_tasks(model, tokenizer, TASKS, data_dir=tasks_dir, batch_size=batch_size, limit=limit)
    except Exception as err:  # noqa: BLE001 - a device without lm-eval's needs still measures the rest
        TASK_ERRORS.append(f"{type(err).__name__}: {err}")
        print("accuracy disabled:", TASK_ERRORS[-1], flush=True)
        return {}
    return {t: {"acc": s.acc, "acc_norm": s.acc_norm, "samples": s.samples} for t, s in scores.items()}


def evaluate(model, plan, tokenizer, dev, reference, args, cfg, device, store_bytes, store) -> dict:
    start = time.perf_counter()
    compressed = apply_plan(copy.deepcopy(model), plan)
    row = measure(compressed, dev, reference, args.batch_size, device)
    row["tasks"] = accuracy(compressed, tokenizer, args.tasks, cfg["limit"], args.eval_batch_size)
    del compressed
    row["bytes"] = predict_size(store, plan).bytes
    row["bytes_ratio"] = row["bytes"] / store_bytes
    row["seconds_eval"] = time.perf_counter() - start
    return row


def run_model(name: str, args, cfg: dict, device: torch.device, save) -> dict:
    path, data = args.shared / "models" / name, args.shared / "data"
    calib_file = data / "calib.jsonl"
    model, tokenizer = load_model(path, dtype="float32", device=device)
    store, _ = load_model(path, dtype="auto", device="cpu")  # bytes as stored (bf16)
    store_bytes = size_of(store).bytes
    dev = load_tokens(tokenizer, data / "dev.txt", cfg["dev_rows"], cfg["dev_len"], seed=1).input_ids
    reference = dev_logits(model, dev, args.batch_size, device)
    out: dict = {"model": name, "settings": cfg, "rows": []}
    out["original"] = {**reference_measure(dev, reference, args.batch_size), "bytes": store_bytes,
                       "tasks": accuracy(model, tokenizer, args.tasks, cfg["limit"], args.eval_batch_size)}
    print(name, "original", out["original"]["ppl"], out["original"]["tasks"], flush=True)

    # MoNE and RS: one calibration pass, statistics shared by every variant
    t = time.perf_counter()
    windows = load_tokens(tokenizer, calib_file, cfg["stats_n"], cfg["stats_len"], seed=0).input_ids
    stats = calibrate(model, windows, batch_size=args.batch_size, device=device).stats
    out["seconds_calibration"] = time.perf_counter() - t
    for ratio in cfg["ratios"]:
        for label, (method, hp) in MONE_VARIANTS.items():
            plan = get_method(method)(stats, ratio, **hp)
            row = evaluate(model, plan, tokenizer, dev, reference, args, cfg, device, store_bytes, store)
            out["rows"].append({"family": "mone", "variant": label, "ratio": ratio, **row,
                                "pruned": plan.metadata.get("pruned")})
            save(out)
            print(name, label, ratio, f"ppl {row['ppl']:.3f} js {row['js']:.4f}", row["tasks"], flush=True)

    # CD-MoE-SR: one greedy search per variant, prefixes for fewer layers
    docs = load_documents(tokenizer, calib_file, cfg["docs"], cfg["doc_len"], seed=0).input_ids
    searches = {}
    for label, hp in CD_VARIANTS.items():
        t = time.perf_counter()
        plan = cd_moe(model, docs, layers=cfg["layers"], batch_size=args.batch_size, device=device,
                      method="cd-moe-sr", **hp)
        searches[label] = {"seconds": time.perf_counter() - t, "order": plan.metadata["order"],
                           "experts": {k: v["order"] for k, v in plan.metadata["experts"].items()},
                           "curve": plan.metadata["curve"], "hyperparameters": plan.hyperparameters}
        for n in cfg["steps"]:
            sub = prefix_plan(plan, n)
            row = evaluate(model, sub, tokenizer, dev, reference, args, cfg, device, store_bytes, store)
            out["rows"].append({"family": "cd-moe", "variant": label, "layers": n, **row,
                                "order": sub.metadata["order"]})
            out["searches"] = searches
            save(out)
            print(name, label, n, f"ppl {row['ppl']:.3f} js {row['js']:.4f}", row["tasks"], flush=True)
    out["searches"] = searches
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder holding models/ and data/")
    ap.add_argument("--tasks", type=Path, default=None, help="task jsonl folder (default SHARED/data/tasks)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-batch-size", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 4)
    args.eval_batch_size = args.eval_batch_size or (64 if device.type == "cuda" else 8)
    args.tasks = args.tasks or args.shared / "data" / "tasks"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        t = time.perf_counter()
        out = args.out_dir / f"fidelity_{name}{args.tag}.json"

        def save(result: dict, t=t, out=out) -> None:  # after every row: a cut-short run keeps its rows
            result.update(seconds_total=time.perf_counter() - t, environment=environment(device),
                          task_errors=TASK_ERRORS)
            out.write_text(json.dumps(result, indent=1))

        result = run_model(name, args, cfg, device, save)
        save(result)
        print(f"wrote {out} ({result['seconds_total']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
