"""CD-MoE fine-tuning quality: the reference recipe against `--recipe fast`, each an LM stage then an SFT
stage, on the n-layer CD-MoE-SR outputs of the bundled mini checkpoints.

For each checkpoint: the CD-MoE-SR output with `--layers N` (read from `--outputs DIR/<model>-cdsr<N>`,
or written there first with `moepress.compress(..., "cd-moe-sr", layers=N, data=calib.jsonl)`, the
CLI's defaults otherwise) is evaluated, then fine-tuned once per recipe from that same output, exactly
as `moepress finetune OUT --data calib.txt --tokens T --sft PAIRS --recipe R` does (float32 weights,
bf16 autocast on a GPU; `moepress.finetune.output.finetune_output` minus the writing), and evaluated
again. Evaluation is `moepress eval`'s (`moepress.evaluate.pair.evaluate_pair`): perplexity over the
first `--eval-tokens` tokens of dev.txt in non-overlapping windows of `--window` tokens (512, the
length the checkpoints were trained on; the CLI's default is 2048), and zero-shot hellaswag / piqa
(`--tasks hellaswag,piqa --task-data ../shared/data/tasks`, lm-eval, 1,000 items each). Perplexity
after the LM stage alone is measured inside `finetune` on the same windows. Training seconds exclude
those perplexity passes. SFT pairs: `bench/sft_pairs.py` on calib.jsonl (never dev text).

    python bench/sft_pairs.py -o bench/results/sft_pairs.jsonl
    python bench/finetune_quality.py --device cuda --sft bench/results/sft_pairs.jsonl --tokens 1M
    python bench/finetune_quality.py --models qwen2moe-mini --tokens 8k --task-limit 20 --max-sft 16  # CPU smoke

Writes bench/results/finetune_quality_<model>_<gpu>.json per checkpoint (`--out-dir`) and prints a table.
`--original` evaluates the original checkpoints instead (same protocol; no fine-tuning).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from _common import MODELS, ROOT, SHARED, environment

import moepress.finetune.train as train_module
from moepress.evaluate.pair import evaluate_pair
from moepress.evaluate.perplexity import load_eval_ids, perplexity
from moepress.finetune import finetune, load_train_ids, read_sft_pairs, resolve_recipe, tokenize_sft
from moepress.finetune.output import SFT_MAX_LENGTH, parse_count
from moepress.io.save import PLAN_FILE
from moepress.models.loading import load_model
from moepress.plan import CompressionPlan, Condense

TASKS = ("hellaswag", "piqa")
RECIPES = ("reference", "fast")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((t for t in ("h200", "h100", "a100", "l40") if t in name), name.split()[-1])


def evaluate(model, tokenizer, ppl_ids, args, device, problems: list[str]) -> dict:
    """`moepress eval`'s measurement of one in-memory model: perplexity and the tasks' acc / acc_norm."""
    sync(device)
    start = time.perf_counter()
    tasks = [] if args.no_tasks else list(TASKS)
    try:
        r = evaluate_pair(model, None, tokenizer, ppl_ids, tasks, window=args.window, batch_size=args.batch_size,
                          task_data=str(args.task_data), task_limit=args.task_limit)
    except Exception as err:  # noqa: BLE001 - lm-eval missing or broken: keep the perplexity
        problems.append(f"tasks: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        r = evaluate_pair(model, None, tokenizer, ppl_ids, [], window=args.window, batch_size=args.batch_size)
    sync(device)
    ppl = r["perplexity"]["compressed"]
    out = {"ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "window": ppl["window"], "tasks": {},
           "seconds": time.perf_counter() - start}
    for task, s in ((r.get("tasks") or {}).get("compressed") or {}).items():
        out["tasks"][task.removesuffix("_local")] = {k: s[k] for k in ("acc", "acc_norm", "acc_norm_stderr", "samples")}
    return out


@contextlib.contextmanager
def timed_ppl(window: int, batch_size: int, device: torch.device):
    """Inside the block, `finetune`'s perplexity passes use `evaluate`'s windows and are timed."""
    clock = {"seconds": 0.0, "calls": 0}
    original = train_module._ppl

    def ppl(model, ids, _batch_size):
        if ids is None:
            return None
        sync(device)
        start = time.perf_counter()
        value = perplexity(model, ids, window=window, batch_size=batch_size).ppl
        sync(device)
        clock["seconds"] += time.perf_counter() - start
        clock["calls"] += 1
        return value

    train_module._ppl = ppl
    try:
        yield clock
    finally:
        train_module._ppl = original


def cd_moe_output(name: str, args) -> Path:
    folder = args.outputs / f"{name}-cdsr{args.layers}"
    if (folder / PLAN_FILE).is_file():
        return folder
    if not args.compress:
        raise SystemExit(f"{folder} holds no CD-MoE-SR output; pass --compress to write it")
    import moepress

    args.outputs.mkdir(parents=True, exist_ok=True)
    return Path(moepress.compress(args.models_dir / name, "cd-moe-sr", folder, data=args.data_dir / "calib.jsonl",
                                  layers=args.layers, device=str(args.device)))


def summary(values: list[float], k: int = 10) -> dict:
    if not values:
        return {}
    return {"first": sum(values[:k]) / len(values[:k]), "last": sum(values[-k:]) / len(values[-k:]), "n": len(values)}


def run_recipe(recipe_name: str, folder: Path, pairs, ppl_ids, args, device, problems) -> dict:
    model, tokenizer = load_model(folder, dtype=args.dtype, device="cpu")  # as `moepress finetune` loads it
    plan = CompressionPlan.load(folder / PLAN_FILE)
    recipe = resolve_recipe(recipe_name)
    train_ids = load_train_ids(tokenizer, args.data_dir / "calib.txt", args.tokens, recipe.seq_len, args.seed)
    sft = None if pairs is None else tokenize_sft(tokenizer, pairs, max_length=SFT_MAX_LENGTH)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timed_ppl(args.window, args.batch_size, device) as clock:
        sync(device)
        start = time.perf_counter()
        model, result = finetune(model, plan, train_ids, ppl_ids, recipe=recipe, tokens=args.tokens, sft=sft,
                                 seed=args.seed, device=device)
        sync(device)
        wall = time.perf_counter() - start
    after = evaluate(model, tokenizer, ppl_ids, args, device, problems)
    r = result.to_dict()
    return {
        "recipe": recipe.to_dict(), "layers": result.layers, "trainable_parameters": result.trainable_parameters,
        "lm_steps": result.steps, "lm_tokens": result.tokens,
        "sft_steps": result.sft_steps, "sft_examples": result.sft_examples,
        "sft_answer_tokens": result.sft_tokens, "sft_skipped": 0 if sft is None else sft.skipped,
        "sft_tokens": 0 if sft is None else int(sft.attention_mask.sum()),
        "train_seconds": wall - clock["seconds"], "finetune_wall_seconds": wall, "ppl_pass_seconds": clock["seconds"],
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "ppl_before": r["ppl_before"], "ppl_after_lm": r["ppl_after_lm"], "ppl_after": r["ppl_after"],
        "lm_loss": summary(r["losses"]), "sft_loss": summary(r["sft_losses"]),
        "lm_losses": r["losses"], "sft_losses": r["sft_losses"], "after": after,
    }


def run_model(name: str, args, device, pairs, save=lambda out: None) -> dict:
    """Everything for one checkpoint; `save(out)` after each stage, so a run cut short keeps what it did."""
    problems: list[str] = []
    out: dict = {"model": name, "problems": problems}
    if args.original or args.original_ppl:  # the original on the same windows (perplexity only unless --original)
        model, tokenizer = load_model(args.models_dir / name, dtype=args.dtype, device="cpu")
        model.to(device)
        ppl_ids = load_eval_ids(tokenizer, args.data_dir / "dev.txt", max_tokens=args.eval_tokens)
        if args.original:
            out["before"] = evaluate(model, tokenizer, ppl_ids, args, device, problems)
            return out
        p = perplexity(model, ppl_ids, window=args.window, batch_size=args.batch_size)
        out["original"] = {"ppl": p.ppl, "ppl_tokens": p.tokens, "window": p.window}
        del model
    sync(device)
    start = time.perf_counter()
    folder = cd_moe_output(name, args)
    sync(device)
    out["folder"], out["compress_seconds"] = str(folder), time.perf_counter() - start
    model, tokenizer = load_model(folder, dtype=args.dtype, device="cpu")  # the dtype fine-tuning keeps
    model.to(device)
    ppl_ids = load_eval_ids(tokenizer, args.data_dir / "dev.txt", max_tokens=args.eval_tokens)
    out["before"] = evaluate(model, tokenizer, ppl_ids, args, device, problems)
    plan = CompressionPlan.load(folder / PLAN_FILE)
    condensed = sorted(i for i, a in plan.layers.items() if isinstance(a, Condense))
    out["plan"] = {"method": plan.method, "condensed": condensed}
    del model
    out["recipes"] = {}
    save(out)
    for recipe in args.recipes:
        out["recipes"][recipe] = run_recipe(recipe, folder, pairs, ppl_ids, args, device, problems)
        print_row(name, recipe, out)
        save(out)
    return out


def acc(e: dict, task: str) -> str:
    t = e["tasks"].get(task)
    return "—" if t is None else f"{t['acc']:.3f}/{t['acc_norm']:.3f}"


def print_row(name: str, recipe: str, out: dict) -> None:
    r, b = out["recipes"][recipe], out["before"]
    a = r["after"]
    print(f"{name} {recipe}: ppl {b['ppl']:.2f} -> {r['ppl_after_lm']:.2f} (LM) -> {a['ppl']:.2f} (SFT); "
          f"hellaswag {acc(b, 'hellaswag')} -> {acc(a, 'hellaswag')}; piqa {acc(b, 'piqa')} -> {acc(a, 'piqa')}; "
          f"{r['lm_tokens']:,} LM + {r['sft_tokens']:,} SFT tokens ({r['lm_steps']} + {r['sft_steps']} steps), "
          f"{r['train_seconds']:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="loading dtype; auto = float32 from the CPU, as the CLI loads")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--outputs", type=Path, default=ROOT / ".ftq", help="holds <model>-cdsr<layers>/")
    ap.add_argument("--compress", action="store_true", help="write a missing CD-MoE-SR output first")
    ap.add_argument("--original", action="store_true", help="evaluate the original checkpoints only")
    ap.add_argument("--original-ppl", action="store_true", help="also the original's perplexity (same windows)")
    ap.add_argument("--models-dir", type=Path, default=SHARED / "models")
    ap.add_argument("--data-dir", type=Path, default=SHARED / "data", help="calib.txt, calib.jsonl, dev.txt")
    ap.add_argument("--task-data", type=Path, default=None, help="[DATA_DIR/tasks]")
    ap.add_argument("--sft", type=Path, default=None, help="prompt/answer .jsonl (bench/sft_pairs.py)")
    ap.add_argument("--max-sft", type=int, default=None, help="first N pairs only (smoke runs)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--tokens", default="1M", help="LM-stage tokens per recipe")
    ap.add_argument("--eval-tokens", type=int, default=131072)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch (perplexity and tasks)")
    ap.add_argument("--task-limit", type=int, default=None)
    ap.add_argument("--no-tasks", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.tokens = parse_count(args.tokens)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.task_data = args.task_data or args.data_dir / "tasks"
    device = args.device = torch.device(args.device)
    torch.manual_seed(args.seed)
    pairs = None if args.sft is None else read_sft_pairs(args.sft)
    if pairs is not None and args.max_sft:
        pairs = pairs[: args.max_sft]
    tag = gpu_tag(device)
    config = {k: str(v) if isinstance(v, Path | torch.device) else v for k, v in vars(args).items()}
    for name in args.models.split(","):
        start = time.perf_counter()
        suffix = "_original" if args.original else ""
        path = args.out_dir / f"finetune_quality_{name}{suffix}_{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {**environment(device), "config": config, "sft_pairs": None if pairs is None else len(pairs)}

        def save(out: dict, done: bool = False, path=path, head=head, start=start) -> None:
            path.write_text(json.dumps({**head, **out, "complete": done,
                                        "seconds": time.perf_counter() - start}, indent=1) + "\n")

        result = run_model(name, args, device, pairs, save)
        save(result, done=True)
        result["seconds"] = time.perf_counter() - start
        b = result["before"]
        orig = f"original ppl {result['original']['ppl']:.2f}; " if "original" in result else ""
        print(f"== {name}{suffix}: {orig}ppl {b['ppl']:.2f}, hellaswag {acc(b, 'hellaswag')}, piqa {acc(b, 'piqa')}; "
              f"{result['seconds']:.0f} s -> {path}", flush=True)
        if result["problems"]:
            print("problems:", *result["problems"], sep="\n  ")


if __name__ == "__main__":
    main()
