"""Speed benchmark: memory, prefill and decode tokens/s of full-size MoE models before and after
compression, measured in one process on one GPU.

Models are random-initialised from the PUBLISHED configs of DeepSeek-V2-Lite (15.7B) and
Qwen1.5-MoE-A2.7B (14.3B), built directly on the GPU in bf16 (weights' values do not change speed;
routers get the usual N(0, 0.02) init, so routing is close to uniform, like a load-balanced model).
Variants, each built from the same seed and compressed with `apply_plan`:
  original   the model as published
  cd-sr2     CD-MoE-SR, k=2: the deeper half of the MoE layers condensed to shared + 2 routed experts
  cd-s       CD-MoE-S: the deeper half of the MoE layers condensed to the shared experts alone
  prune25    25% of the routed experts removed from every MoE layer
  prune50    50% removed
The "limit" column is the speed-up batch-1 decoding could reach if it were purely bound by reading
weights: original bytes read per token / compressed bytes read per token, where a token reads
attention, dense MLPs, shared experts, routers, the LM head, one embedding row, and top_k routed
experts per MoE layer (a condensed layer reads all its rows). Pruning keeps top_k, so its limit is
~1: it saves memory, not per-token bytes.

    python bench/speed_bench.py                      # both models, ~6 min on one H100
    python bench/speed_bench.py --models dsv2-lite --variants original cd-s
    python bench/speed_bench.py --small              # CPU, seconds: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moepress.evaluate.speed import SpeedResult, measure_speed, speed_ratios  # noqa: E402
from moepress.models import get_adapter  # noqa: E402
from moepress.plan import CompressionPlan, Condense, Prune  # noqa: E402

SHAPES = {
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json (YaRN rope left out:
    # it changes the rotary frequencies, not the cost)
    "dsv2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        head_dim=64, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json
    "qwen1.5-moe": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=8192,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}
SMALL = {  # same structure, CPU-sized
    "dsv2-lite": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=32,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, head_dim=16),
    "qwen1.5-moe": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=32,
                        shared_expert_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, num_experts=16),
}
VARIANTS = ("original", "cd-sr2", "cd-s", "prune25", "prune50")


def make_config(name: str, small: bool, experts_impl: str | None):
    from transformers import AutoConfig

    kw = dict(SHAPES[name], **(SMALL[name] if small else {}))
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    if experts_impl:
        cfg._experts_implementation = experts_impl
    return cfg


def build(cfg, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights allocated and initialised where they will run (no CPU init, no copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        # a copy: surgery records the compressed structure on the model's config
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=dtype)
    return model.eval()


def make_plan(variant: str, model) -> CompressionPlan | None:
    if variant == "original":
        return None
    adapter = get_adapter(model)
    moe = adapter.moe_layer_ids(model)
    first = adapter.block(moe[0], adapter.layers(model)[moe[0]])
    n = first.num_experts
    deeper_half = moe[len(moe) // 2 :]
    if variant == "cd-sr2":
        layers = {i: Condense(experts=[0, 1], weights=[0.5, 0.5]) for i in deeper_half}
    elif variant == "cd-s":
        layers = {i: Condense(experts=[], weights=[]) for i in deeper_half}
    elif variant in ("prune25", "prune50"):
        keep = n - n * int(variant[-2:]) // 100
        layers = {i: Prune(keep_experts=list(range(keep))) for i in moe}
    else:
        raise ValueError(variant)
    return CompressionPlan(method=f"bench-{variant}", layers=layers)


def run_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from moepress.surgery.apply import apply_plan

    cfg = make_config(name, args.small, args.experts_impl)
    results: dict[str, SpeedResult] = {}
    record: dict = {"model": name, "small": args.small, "variants": {}}
    for variant in args.variants:
        t0 = time.perf_counter()
        model = build(cfg, device, dtype, args.seed)
        plan = make_plan(variant, model)
        if plan is not None:
            model = apply_plan(model, plan)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_build = time.perf_counter() - t0
        if not results:
            # one short throwaway pass first: kernel selection, library handles and allocator pools
            # are set up once per process, which would otherwise slow only the first variant
            measure_speed(model, batch_sizes=args.batch_sizes, prompt_len=min(args.prompt_len, 32),
                          new_tokens=2, warmup=0, repeats=1)
        res = measure_speed(model, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats)
        t_measure = time.perf_counter() - t0 - t_build
        results[variant] = res
        entry: dict = {"speed": res.to_dict(), "build_s": t_build, "measure_s": t_measure}
        if "original" in results:
            cmp = speed_ratios(results["original"], res).to_dict()
            entry["vs_original"] = {k: v for k, v in cmp.items() if k not in ("original", "compressed")}
        record["variants"][variant] = entry
        print(f"[{name}] {variant}: built in {t_build:.1f}s, measured in {t_measure:.1f}s; "
              f"decode tok/s {fmt_map(res.decode_tokens_per_s)}", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["device"] = next(iter(results.values())).device
    record["experts_implementation"] = next(iter(results.values())).experts_implementation
    return record


def fmt_map(d: dict) -> str:
    return ", ".join(f"b={k}: {v:,.1f}" for k, v in d.items())


def size(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def print_table(record: dict, batch_sizes: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    cpu = record["variants"][next(iter(record["variants"]))]["speed"]["cpu_timing"]
    title = f"{record['model']} on {record['device']}" + (" (CPU numbers: not GPU speed)" if cpu else "")
    cols = ["variant", "params", "bytes ratio"]
    cols += [f"peak mem b={b}" for b in batch_sizes]
    cols += [f"prefill tok/s b={b}" for b in batch_sizes] + [f"decode tok/s b={b}" for b in batch_sizes]
    cols += [f"prefill × b={b}" for b in batch_sizes] + [f"decode × b={b}" for b in batch_sizes]
    cols += ["read/token b=1", "limit × b=1"]
    table = Table(*cols, title=title)
    for variant, e in record["variants"].items():
        s, r = e["speed"], e.get("vs_original", {})
        row = [variant, size(s["param_bytes"]["total"]), f"{r.get('bytes_ratio', 1.0):.3f}"]
        row += [size(s["peak_memory_bytes"][b]) for b in batch_sizes]
        row += [f"{s['prefill_tokens_per_s'][b]:,.0f}" for b in batch_sizes]
        row += [f"{s['decode_tokens_per_s'][b]:,.1f}" for b in batch_sizes]
        for key in ("prefill_speedup", "decode_speedup"):
            row += [f"{r[key][b]:.2f}" if r.get(key, {}).get(b) else "–" for b in batch_sizes]
        limit = r.get("decode_bytes_limit_speedup", 1.0)
        row += [size(s["decode_bytes_per_token"]), f"{limit:.2f}"]
        table.add_row(*row)
    Console(width=250).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 32 (--small: 1 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (16 with --small)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (4 with --small)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --small)")
    ap.add_argument("--experts-impl", default=None, help="eager, batched_mm or grouped_mm (the default)")
    ap.add_argument("--small", action="store_true", help="CPU-sized models in float32: a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.small else [1, 32])
    args.prompt_len = args.prompt_len or (16 if args.small else 256)
    args.new_tokens = args.new_tokens or (4 if args.small else 32)
    args.repeats = args.repeats or (1 if args.small else 3)
    if "original" not in args.variants:
        args.variants.insert(0, "original")  # every ratio is against it
    args.variants = [v for v in VARIANTS if v in args.variants]

    if args.small:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        sys.exit("no GPU visible: run with --small for a CPU smoke test")
    import transformers

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        record = run_model(name, args, device, dtype)
        record.update(
            torch=torch.__version__, transformers=transformers.__version__, batch_sizes=args.batch_sizes,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats,
        )
        print_table(record, args.batch_sizes)
        fname = f"speed_{name}{'_small' if args.small else ''}.json"
        text = json.dumps(record, indent=1)
        (args.out / fname).write_text(text)
        if os.environ.get("OUT"):  # the remote device tool brings back what lands here
            Path(os.environ["OUT"], fname).write_text(text)
        print(f"wrote {args.out / fname}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
