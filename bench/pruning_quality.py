"""Expert-pruning quality on the bundled mini checkpoints: every method × ratio, measured held out.

For each checkpoint in ../shared/models: one calibration pass on calib.txt (statistics plus the
sampled MoE-layer inputs NAEE's search and the merging methods read), then for every registered
method (MoNE, its ablations variance and frequency+novice, the baselines frequency, random, reap,
naee, and the expert-merging methods hc-smoe, m-smoe and ream — ream re-runs the model layer by layer
on the same calibration tokens) and every ratio: plan → surgery on a fresh copy → perplexity on
held-out dev.txt tokens (never calibration text) and JS / KL divergence and top-1 agreement of
next-token distributions to the original on the same tokens, plus the checkpoint's bytes predicted
from the plan; with --tasks, also zero-shot accuracy (lm-eval) on the task files there
(hellaswag.jsonl 4-way, piqa.jsonl 2-way, cut from held-out text). At the write ratio (0.25) the
pruned model is also written with `save_compressed` (which reloads and compares logits) into a
temporary folder: the safetensors tensor bytes must equal the prediction, and a folder without
novices must load with plain `AutoModelForCausalLM.from_pretrained` (no missing or unexpected keys,
same logits); both are recorded, and a failed check makes the script exit 1 after writing results.

Models are evaluated in float32 (--dtype) on --device; bytes are those of the checkpoint in its
stored dtype (bf16), predicted on and written from a CPU copy in that dtype.

    python bench/pruning_quality.py --quick                    # one model, ratio 0.25, CPU, < 3 min
    python bench/pruning_quality.py --device cuda --tag h100   # all models × methods × ratios
    python bench/pruning_quality.py --device cuda --methods hc-smoe m-smoe ream --ratios 0.25 0.5 \
        --tasks ../shared/data/tasks --tag merging             # the merging rows, with accuracy
    python bench/pruning_quality.py --methods hc-smoe@router=representative ...   # with hyperparameters

Prints a table per model and writes bench/results/pruning_quality[_TAG].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from _common import (
    MODELS,
    ROOT,
    SHARED,
    dev_logits,
    environment,
    measure,
    reference_measure,
    shard_files,
    written_size,
)

from moepress.calibrate import calibrate
from moepress.data import load_tokens
from moepress.evaluate.perplexity import perplexity
from moepress.io import predict_size, save_compressed, size_of
from moepress.methods import available_methods, get_method
from moepress.methods.base import ModelInputs, method_is_sequential
from moepress.models import get_adapter
from moepress.models.loading import load_model, resolve_device
from moepress.pipeline import calibration_tokens
from moepress.plan import CompressionPlan, model_fingerprint
from moepress.surgery import apply_plan

RATIOS = (0.125, 0.25, 0.5)
WRITE_RATIO = 0.25
# calibration sequences × length, held-out dev tokens (rows of eval_len), sampled MoE inputs per layer
# (NAEE and the merging methods), examples per task (None: all)
FULL = dict(n=128, seq_len=512, eval_tokens=131072, eval_len=512, naee_tokens=512, task_limit=None)
QUICK = dict(n=8, seq_len=256, eval_tokens=4096, eval_len=512, naee_tokens=128, task_limit=20)
TASKS = ("hellaswag", "piqa")
DEV_SEED = 1  # the dev windows are a seeded sample of dev.txt (calibration uses seed 0 on calib.txt)


def stored_dtype(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


@torch.no_grad()
def plain_load_check(folder: Path, compressed) -> dict:
    """Does plain transformers (no custom code) rebuild exactly this model from the folder?

    `from_pretrained` also "succeeds" on a novice checkpoint by building the uncompressed architecture
    and leaving weights missing, so success means: no missing / unexpected / mismatched keys and the
    same logits as the in-memory compressed model on a few token ids.
    """
    from transformers import AutoModelForCausalLM

    from moepress.io.verify import probe_ids

    p = next(compressed.parameters())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=p.dtype, trust_remote_code=False, output_loading_info=True
        )
    except Exception as err:  # noqa: BLE001 - any refusal means "not plain-loadable"
        return {"plain_loadable": False, "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    bad = {k: sorted(v)[:4] for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        return {"plain_loadable": False, "reason": f"loads with key problems: {bad}"}
    ids = probe_ids(compressed.config.vocab_size)
    want, got = compressed.eval()(ids).logits.float(), model.eval()(ids).logits.float()
    diff = (want - got).abs().max().item()
    ok = diff <= 1e-2 * max(1.0, want.abs().max().item())
    return {"plain_loadable": ok, "max_logit_diff": diff, **({} if ok else {"reason": "logits differ"})}


def accuracy(model, tokenizer, args, cfg: dict, problems: list[str]) -> dict:
    """Zero-shot accuracy on --tasks (empty when not asked for)."""
    if args.tasks is None:
        return {}
    from moepress.evaluate.lm_eval_bridge import run_tasks

    try:
        scores = run_tasks(model, tokenizer, TASKS, data_dir=args.tasks, batch_size=args.batch_size,
                           limit=cfg["task_limit"])
    except Exception as err:  # noqa: BLE001 - recorded; the other measures stand
        problems.append(f"accuracy: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return {}
    return {t: {"acc": s.acc, "acc_norm": s.acc_norm, "samples": s.samples} for t, s in scores.items()}


def _guard_size(folder: Path) -> tuple[int, int]:
    """(params, bytes) of the native format's guard tensors (`*.moepress_novice_guard.*`) in a written folder."""
    from safetensors import safe_open

    params = nbytes = 0
    for shard in shard_files(folder):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if ".moepress_novice_guard." in key:
                    t = f.get_tensor(key)
                    params, nbytes = params + t.numel(), nbytes + t.numel() * t.element_size()
    return params, nbytes


def write_and_check(store, plan: CompressionPlan, source: Path, predicted) -> dict:
    """Apply `plan` to a copy of the stored-dtype model, write it, and compare with the prediction."""
    compressed = apply_plan(copy.deepcopy(store), plan)
    with tempfile.TemporaryDirectory(prefix="moepress-pq-") as tmp:
        out = save_compressed(compressed, plan, Path(tmp) / "out", source=source, verify=True)
        params, nbytes = written_size(out)
        guard_params, guard_bytes = _guard_size(out)
        config = json.loads((out / "config.json").read_text())
        check = plain_load_check(out, compressed)
    return {
        "bytes": nbytes,
        "params": params,
        # vLLM's native novice format adds one guard copy of a novice vector (what stops a vLLM without
        # expert substitution loudly): a deployment artefact the plan's prediction does not count
        "guard_bytes": guard_bytes,
        "bytes_equal_prediction": nbytes - guard_bytes == predicted.bytes and params - guard_params == predicted.params,
        "plain_config": "moepress_structure" not in config,
        "verified_reload": True,  # save_compressed(verify=True) raised otherwise
        **check,
    }


def run_model(name: str, args, cfg: dict, device: torch.device, problems: list[str]) -> dict:
    path, data = args.shared / "models" / name, args.shared / "data"
    t_model = time.perf_counter()
    model, tokenizer = load_model(path, dtype=args.dtype, device=device)
    # the checkpoint as stored (bf16, CPU): what bytes are predicted on and checkpoints written from
    store, _ = load_model(path, dtype=stored_dtype(path), device="cpu")
    assert model_fingerprint(store) == model_fingerprint(model)
    original = size_of(store)
    on_disk = written_size(path)
    if on_disk != (original.params, original.bytes):
        problems.append(f"{name}: source shards hold {on_disk} (params, bytes), size_of says {original}")

    # one calibration pass: statistics for every method, sampled MoE inputs for NAEE
    start = time.perf_counter()
    calib = calibration_tokens(model, tokenizer, str(data / "calib.txt"), cfg["n"], cfg["seq_len"], seed=0)
    meta = {"model_fingerprint": model_fingerprint(model), "data": "calib.txt",
            "data_fingerprint": calib.fingerprint, "seed": 0}
    result = calibrate(model, calib.input_ids, batch_size=args.batch_size, keep_moe_inputs=cfg["naee_tokens"],
                       device=device, meta=meta, seed=0)
    stats, moe_inputs = result.stats, result.moe_inputs
    calib_seconds = time.perf_counter() - start
    blocks = get_adapter(model).blocks(model)

    dev = load_tokens(tokenizer, data / "dev.txt", cfg["eval_tokens"] // cfg["eval_len"], cfg["eval_len"],
                      seed=DEV_SEED).input_ids
    start = time.perf_counter()
    reference = dev_logits(model, dev, args.batch_size, device)
    base = reference_measure(dev, reference, args.batch_size)
    eval_seconds = time.perf_counter() - start
    # cross-check on a few rows: the library's windowed perplexity (a row is a window) gives the same
    rows = min(4, len(reference[0]))
    check = {"rows": rows, "perplexity()": perplexity(model, dev[:rows], window=cfg["eval_len"]).ppl,
             "benchmark": reference_measure(dev[:rows], [reference[0][:rows]], rows)["ppl"]}
    if not math.isclose(check["perplexity()"], check["benchmark"], rel_tol=1e-3):
        problems.append(f"{name}: on {rows} dev rows perplexity() gives {check['perplexity()']:.4f}, "
                        f"the benchmark's measure {check['benchmark']:.4f}")

    base["tasks"] = accuracy(model, tokenizer, args, cfg, problems)
    context = {"calibration_ids": calib.input_ids, "tokenizer": tokenizer, "cfg": cfg}
    out: dict = {
        "path": path.name,
        "stored_dtype": stored_dtype(path),
        "moe_layers": len(stats.layers),
        "experts": sorted({stats[i].num_experts for i in stats.layers}),
        "top_k": sorted({stats[i].top_k for i in stats.layers}),
        "tokens": {
            "calibration": int(calib.input_ids.numel()),
            "calibration_shape": list(calib.input_ids.shape),
            "naee_sampled_per_layer": {str(i): int(x.shape[0]) for i, x in sorted(moe_inputs.items())},
            "eval": int(dev.numel()),
            "eval_scored": int(dev[:, 1:].numel()),
            "eval_shape": list(dev.shape),
        },
        "calibration_fingerprint": calib.fingerprint,
        "seconds": {"calibration": calib_seconds, "original_eval": eval_seconds},
        "original": {**base, "ppl_check": check, "bytes": original.bytes, "params": original.params,
                     "bytes_on_disk": on_disk[1]},
        "rows": [],
        "method_seconds": {},
    }
    for method in args.methods:
        t_method = time.perf_counter()
        for ratio in args.ratios:
            row = run_one(name, method, ratio, model, store, path, stats, blocks, moe_inputs, dev, reference,
                          base, original, args, device, problems, context)
            out["rows"].append(row)
        out["method_seconds"][method] = time.perf_counter() - t_method
    out["seconds"]["total"] = time.perf_counter() - t_model
    return out


def method_spec(method: str) -> tuple[str, dict]:
    """`hc-smoe@router=representative,linkage=single` → ("hc-smoe", {"router": "representative", ...}):
    a method with hyperparameters, as one --methods entry (values stay strings unless numbers)."""
    name, _, rest = method.partition("@")
    hp = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            hp[key] = float(value) if "." in value else int(value)
        except ValueError:
            hp[key] = value
    return name, hp


def run_one(name, method, ratio, model, store, path, stats, blocks, moe_inputs, dev, reference, base,
            original, args, device, problems, context) -> dict:
    seconds = {}
    start = time.perf_counter()
    extra = {}
    name_only, hp = method_spec(method)
    if method_is_sequential(name_only):  # ream: re-runs the model on the calibration tokens, layer by layer
        extra["model_inputs"] = ModelInputs(model, context["calibration_ids"], args.batch_size, device)
    plan = get_method(name_only)(stats, ratio, seed=args.seed, blocks=blocks, moe_inputs=moe_inputs, **extra, **hp)
    seconds["plan"] = time.perf_counter() - start

    start = time.perf_counter()
    compressed = apply_plan(copy.deepcopy(model), plan)
    seconds["apply"] = time.perf_counter() - start
    start = time.perf_counter()
    quality = measure(compressed, dev, reference, args.batch_size, device)
    quality["tasks"] = accuracy(compressed, context["tokenizer"], args, context["cfg"], problems)
    seconds["eval"] = time.perf_counter() - start
    del compressed
    predicted = predict_size(store, plan)

    novices = bool(plan.metadata.get("novices"))
    # merges keeping every router row (the default) are moepress's own format, never plain
    plain = not novices and not any(getattr(e, "router_rows", "kept") == "all" for e in plan.layers.values())
    row = {
        "method": method,
        "ratio": ratio,
        **quality,
        "delta_ppl": quality["ppl"] - base["ppl"],
        "bytes": predicted.bytes,
        "params": predicted.params,
        "bytes_ratio": predicted.bytes / original.bytes,
        "novices": novices,
        "pruned_per_layer": {k: len(v) for k, v in plan.metadata["pruned"].items()},
        "pruned": plan.metadata["pruned"],
        "hyperparameters": plan.hyperparameters,
    }
    if "groups" in plan.metadata:  # merging: group sizes per layer (how many experts each kept one holds)
        row["group_sizes"] = {k: sorted((len(g) for g in v), reverse=True) for k, v in plan.metadata["groups"].items()}
    if "search" in plan.metadata:  # NAEE: which search ran per layer
        row["search"] = dict(Counter(plan.metadata["search"].values()))
    if math.isclose(ratio, args.write_ratio):
        start = time.perf_counter()
        written = write_and_check(store, plan, path, predicted)
        seconds["write"] = time.perf_counter() - start
        written["plain_expected"] = plain
        row["written"] = written
        if not written["bytes_equal_prediction"]:
            problems.append(f"{name} {method} {ratio}: wrote {written['bytes']} bytes / {written['params']} "
                            f"params, predicted {predicted.bytes} / {predicted.params}")
        if plain and not written["plain_loadable"]:
            problems.append(f"{name} {method} {ratio}: not loadable with plain transformers: "
                            f"{written.get('reason')}")
    row["seconds"] = seconds
    return row


def print_table(name: str, r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    o, t = r["original"], r["tokens"]
    title = (f"{name}: original dev ppl {o['ppl']:.2f}, {o['bytes'] / 2**20:.2f} MiB — "
             f"{t['eval_scored']} held-out dev tokens, {t['calibration']} calibration tokens "
             f"({r['seconds']['calibration']:.1f} s)")
    table = Table(title=title, title_justify="left")
    tasks = sorted(o.get("tasks", {}))
    for col in ("method", "ratio", "dev ppl", "Δppl", "JS", "top-1", *(f"{t} acc_n" for t in tasks), "MiB",
                "% bytes", "written (0.25)", "s"):
        table.add_column(col, justify="left" if col in ("method", "written (0.25)") else "right")

    def acc(row: dict) -> list[str]:
        return [f"{row['tasks'][t]['acc_norm']:.3f}" if t in row.get("tasks", {}) else "—" for t in tasks]

    disk = "= disk" if o["bytes_on_disk"] == o["bytes"] else "≠ DISK"
    table.add_row("original", "—", f"{o['ppl']:.2f}", "—", "—", "—", *acc(o), f"{o['bytes'] / 2**20:.2f}", "100.0",
                  disk, f"{r['seconds']['original_eval']:.1f}")
    best: dict[float, float] = {}
    for x in r["rows"]:
        best[x["ratio"]] = min(best.get(x["ratio"], math.inf), x["ppl"])
    for x in sorted(r["rows"], key=lambda x: (x["ratio"], x["ppl"])):
        w = x.get("written")
        if w is None:
            written = ""
        else:
            written = ("= pred" if w["bytes_equal_prediction"] else "≠ PRED") + (
                ", plain" if w["plain_loadable"] else ", remote-code")
        ppl = f"{x['ppl']:.2f}"
        table.add_row(
            x["method"], f"{x['ratio']:g}", f"[bold]{ppl}[/]" if x["ppl"] == best[x["ratio"]] else ppl,
            f"{x['delta_ppl']:+.2f}", f"{x['js']:.4f}", f"{x['top1']:.3f}", *acc(x), f"{x['bytes'] / 2**20:.2f}",
            f"{100 * x['bytes_ratio']:.1f}", written, f"{sum(x['seconds'].values()):.1f}",
        )
    Console(width=140).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one model (the first of --models), small calibration / dev sets, ratio 0.25 only")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help=f"folders in SHARED/models ({MODELS})")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--ratios", nargs="+", type=float, default=None, help=f"default {RATIOS} (quick: 0.25)")
    ap.add_argument("--write-ratio", type=float, default=WRITE_RATIO, help="ratio written to disk")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", help="evaluation dtype: float32 (default) or bfloat16")
    ap.add_argument("--n", type=int, default=None, help=f"calibration sequences (default {FULL['n']})")
    ap.add_argument("--seq-len", type=int, default=None, help=f"calibration length ({FULL['seq_len']})")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help=f"held-out dev tokens (default {FULL['eval_tokens']}), in rows of --eval-len")
    ap.add_argument("--eval-len", type=int, default=None, help=f"dev row length (default {FULL['eval_len']})")
    ap.add_argument("--naee-tokens", type=int, default=None,
                    help=f"sampled MoE inputs per layer, NAEE and merging (default {FULL['naee_tokens']})")
    ap.add_argument("--tasks", type=Path, default=None,
                    help="folder with hellaswag.jsonl and piqa.jsonl: also zero-shot accuracy (lm-eval); default off")
    ap.add_argument("--task-limit", type=int, default=None, help="examples per task (default all; quick: 20)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on GPU, 8 on CPU")
    ap.add_argument("--seed", type=int, default=0, help="method seed (random)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder holding models/ and data/")
    ap.add_argument("--tag", default=None, help="results go to bench/results/pruning_quality_TAG.json")
    ap.add_argument("--out", type=Path, default=None, help="results file (overrides --tag)")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    cfg = dict(QUICK if args.quick else FULL)
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.models = [m for arg in args.models for m in arg.split(",") if m]  # "a,b" works too
    if args.quick:
        args.models = args.models[:1]
    args.ratios = args.ratios or ([WRITE_RATIO] if args.quick else list(RATIOS))
    args.methods = args.methods or available_methods()
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    args.shared = args.shared.resolve()
    torch.manual_seed(0)

    suffix = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    out_file = args.out or ROOT / "bench" / "results" / f"pruning_quality{suffix}.json"
    results = {
        **environment(device),
        "mode": "quick" if args.quick else "full",
        "dtype": args.dtype,
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "config": {
            **cfg, "batch_size": args.batch_size, "ratios": args.ratios, "write_ratio": args.write_ratio,
            "methods": args.methods, "seed": args.seed, "dev_seed": DEV_SEED, "calib_seed": 0,
            "calibration_data": "calib.txt", "eval_data": "dev.txt",
            "method_defaults": {m: get_method(method_spec(m)[0]).hyperparameters for m in args.methods},
        },
        "models": {},
        "problems": [],
    }
    start = time.perf_counter()
    for name in args.models:
        results["models"][name] = run_model(name, args, cfg, device, results["problems"])
        print_table(name, results["models"][name])
    results["seconds"] = time.perf_counter() - start
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out_file} ({results['seconds']:.0f} s)")
    for name, r in results["models"].items():
        per = ", ".join(f"{m} {s:.1f}" for m, s in r["method_seconds"].items())
        print(f"{name}: calibration {r['seconds']['calibration']:.1f} s, original eval "
              f"{r['seconds']['original_eval']:.1f} s, per method (s): {per}")
    if results["problems"]:
        print("\nFAILED checks:\n  " + "\n  ".join(results["problems"]))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
