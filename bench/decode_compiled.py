"""Compiled decoding: eager vs static-KV-cache + torch.compile ("reduce-overhead", CUDA graphs) decode
tokens/s of a full-size random-initialised MoE and compressed variants, against each variant's bytes-read
limit (`moepress.evaluate.speed`: the bytes one decode step reads ÷ the memory bandwidth).

Variants, built on the GPU in bf16 from the published config (`speed_bench.SHAPES`) and compressed with
`apply_plan`:
  original   the model as published
  prune50    half of every MoE layer's routed experts removed (a plain checkpoint)
  mone50     MoNE: the same half replaced by novices (constant vectors), routing unchanged
  cd-sr      CD-MoE-SR: the deeper half of the MoE layers condensed to shared + top-k routed experts
  cd-s       CD-MoE-S: the deeper half condensed to the shared experts alone
Medians of `--repeats` timed runs after warm-up, with min–max; each run is one call's decode of
`--new-tokens` tokens after a `--prompt-len` prefill. Results are merged into one JSON per shape, so
variants can be measured in separate calls (compiling a 27-layer model takes minutes).

    python bench/decode_compiled.py --variants original prune50          # one H200, dsv2-lite
    python bench/decode_compiled.py --variants mone50 cd-sr cd-s
    python bench/decode_compiled.py --small                               # CPU, traced only: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed_bench import SHAPES, build, make_config  # noqa: E402

from moepress.evaluate.speed import H200_BANDWIDTH, SpeedResult, measure_speed  # noqa: E402
from moepress.models import get_adapter  # noqa: E402
from moepress.plan import CompressionPlan, Condense, Prune  # noqa: E402

VARIANTS = ("original", "prune50", "mone50", "cd-sr", "cd-s")
REACHES = 0.9  # "reaches its limit": at least this share of the bytes-read limit


def make_plan(variant: str, model) -> CompressionPlan | None:
    if variant == "original":
        return None
    adapter = get_adapter(model)
    moe = adapter.moe_layer_ids(model)
    first = adapter.block(moe[0], adapter.layers(model)[moe[0]])
    n, k, hidden = first.num_experts, first.top_k, first.hidden_size
    deeper_half = moe[len(moe) // 2 :]
    plan = CompressionPlan(method=f"bench-{variant}")
    if variant == "prune50":
        plan.layers = {i: Prune(keep_experts=list(range(n // 2))) for i in moe}
    elif variant == "mone50":
        novices = list(range(n // 2, n))
        plan.layers = {i: Prune(keep_experts=list(range(n // 2)), novices=novices) for i in moe}
        g = torch.Generator().manual_seed(0)
        for i in moe:
            for e in novices:
                plan.set_novice(i, e, torch.randn(hidden, generator=g) * 0.02)
    elif variant == "cd-sr":
        plan.layers = {i: Condense(experts=list(range(k)), weights=[1.0 / k] * k) for i in deeper_half}
    elif variant == "cd-s":
        plan.layers = {i: Condense(experts=[], weights=[]) for i in deeper_half}
    else:
        raise ValueError(variant)
    return plan


def spread(runs: list[float], tokens: int) -> list[float]:
    """[min, max] tokens/s of the timed runs."""
    return [tokens / max(runs), tokens / min(runs)] if runs else []


def summary(res: SpeedResult) -> dict:
    out = {}
    for b in res.decode_tokens_per_s:
        tokens = b * res.new_tokens
        out[str(b)] = {
            "eager_tok_s": res.decode_tokens_per_s[b],
            "eager_tok_s_range": spread(res.decode_runs_s.get(b, []), tokens),
            "compiled_tok_s": res.compiled_decode_tokens_per_s.get(b),
            "compiled_tok_s_range": spread(res.compiled_decode_runs_s.get(b, []), tokens),
            "bytes_per_step": res.decode_bytes_per_step[b],
            "limit_tok_s": b * res.bandwidth_bytes_per_s / res.decode_bytes_per_step[b],
            "eager_share_of_limit": res.bytes_limit_fraction[b],
            "compiled_share_of_limit": res.compiled_bytes_limit_fraction.get(b),
            "compile_s": res.compile_seconds.get(b),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="dsv2-lite")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 32 (--small: 1 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (--small: 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--small: 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--small: 1)")
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s [H200 HBM: 4.8e12]")
    ap.add_argument("--small", action="store_true", help="CPU-sized model, traced only (backend eager)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. the device kind)")
    args = ap.parse_args()
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.small else [1, 32])
    args.prompt_len = args.prompt_len or (8 if args.small else 256)
    args.new_tokens = args.new_tokens or (3 if args.small else 64)
    args.repeats = args.repeats or (1 if args.small else 5)
    if args.small:
        device, dtype, backend = torch.device("cpu"), torch.float32, "eager"
    elif torch.cuda.is_available():
        device, dtype, backend = torch.device("cuda"), torch.bfloat16, "inductor"
    else:
        sys.exit("no GPU visible: run with --small for a CPU smoke test")
    # one graph per batch size and variant; the default limit would fall back to eager silently
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    args.out.mkdir(parents=True, exist_ok=True)
    fname = f"decode_compiled_{args.model}{'_small' if args.small else ''}{'_' + args.tag if args.tag else ''}.json"
    path = args.out / fname
    record = json.loads(path.read_text()) if path.is_file() else {"model": args.model, "variants": {}}
    cfg = make_config(args.model, args.small, None)
    t0 = time.perf_counter()
    for variant in args.variants:
        t = time.perf_counter()
        model = build(cfg, device, dtype, seed=0)
        plan = make_plan(variant, model)
        if plan is not None:
            from moepress.surgery.apply import apply_plan

            model = apply_plan(model, plan)
        counters.clear()
        res = measure_speed(model, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats,
                            compile_mode=args.mode, compile_backend=backend, bandwidth=args.bandwidth)
        record["variants"][variant] = {
            "summary": summary(res), "speed": res.to_dict(), "wall_s": time.perf_counter() - t,
            # a break splits the step into several graphs (and CUDA graphs), each with a launch gap
            "graph_breaks": dict(counters["graph_break"]),
        }
        record.update(device=res.device, dtype=str(dtype).removeprefix("torch."), batch_sizes=args.batch_sizes,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                      repeats=args.repeats, mode=args.mode, backend=backend, bandwidth=args.bandwidth,
                      torch=torch.__version__)
        save(record, path)
        print(f"[{args.model}] {variant}: {time.perf_counter() - t:.0f} s, graph breaks "
              f"{sum(counters['graph_break'].values())}", flush=True)
        del model
        gc.collect()
        torch._dynamo.reset()  # frees the compiled graphs (and their CUDA graph pools) of this variant
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(record)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


def save(record: dict, path: Path) -> None:
    """Write the merged record (after every variant: a run stopped at its time limit keeps the rest)."""
    text = json.dumps(record, indent=1)
    path.write_text(text)
    if os.environ.get("OUT"):  # the remote device tool brings back what lands here
        Path(os.environ["OUT"], path.name).write_text(text)


def print_table(record: dict) -> None:
    gib = 2**30
    print(f"{record['model']} on {record['device']}, bandwidth {record['bandwidth'] / 1e12:g} TB/s, "
          f"prompt {record['prompt_len']}, {record['new_tokens']} new tokens, median [min–max] of "
          f"{record['repeats']}")
    print("| variant | b | read/step | limit tok/s | eager tok/s | compiled tok/s | eager % of limit "
          "| compiled % of limit | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    reached = []
    for variant, entry in record["variants"].items():
        for b, s in entry["summary"].items():
            lo, hi = s["compiled_tok_s_range"] or [0, 0]
            elo, ehi = s["eager_tok_s_range"] or [0, 0]
            compiled = s["compiled_share_of_limit"] or 0
            print(f"| {variant} | {b} | {s['bytes_per_step'] / gib:.2f} GiB | {s['limit_tok_s']:,.0f} | "
                  f"{s['eager_tok_s']:,.1f} [{elo:,.1f}–{ehi:,.1f}] | {s['compiled_tok_s'] or 0:,.1f} "
                  f"[{lo:,.1f}–{hi:,.1f}] | {100 * s['eager_share_of_limit']:.0f}% | {100 * compiled:.0f}% | "
                  f"{s['compile_s'] or 0:.0f} |")
            if compiled >= REACHES:
                reached.append(f"{variant} (b={b}, {100 * compiled:.0f}%)")
    print(f"≥ {100 * REACHES:.0f}% of the bytes-read limit, compiled: " + (", ".join(reached) or "none"))


if __name__ == "__main__":
    main()
