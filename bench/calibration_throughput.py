"""Calibration throughput: tokens/s and the share of the accelerator's FLOP limit that calibrating
a random-initialised MoE model reaches, per statistics path, in one process.

Paths (`--paths`, in this order by default):
- `forward`: the model's own decoder layers over the cached hidden states, no statistics (the ceiling);
- `per_expert`: BEFORE, the original statistics (a Python loop over experts, each expert output
  computed again after the model's own block);
- `hooked`: grouped statistics in a pre-hook, the model's own block still runs (outputs computed twice);
- `fused`: AFTER, the default: the block's forward is the grouped one, every expert output computed
  once for the statistics and the layer output.

FLOPs are counted analytically per token: 2 × the parameters a token passes through in the decoder
layers (attention, router, shared experts, dense MLPs, and top_k of num_experts routed experts;
embedding lookups and the LM head, which calibration never runs, excluded) plus causal attention
scores, heads × (qk_head_dim + v_head_dim) × (seq_len + 1) per layer. The layer-0 hidden states are
captured once per repeat (untimed, reported apart) and kept on the device (`--cache cpu`: on the
host, as `moepress calibrate` does by default). `first_moe_block` in the JSON times each piece of
the first MoE block on one batch (the model's own block, the fused one, routing, sort + gather +
grouped experts, the statistics with the Triton moments kernel and with torch ops, the combine) and says whether the
fused block's output equals the model's own bit for bit.

    python bench/calibration_throughput.py                                   # dsv2-lite on one GPU
    python bench/calibration_throughput.py --shape tiny --device cpu -n 8 --seq-len 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moepress.calibrate import stats as stats_module  # noqa: E402
from moepress.calibrate.runner import LayerInputs, calibrate, capture_inputs, forward_collecting, run_layer  # noqa: E402
from moepress.calibrate.segment_moments import segment_moments, segment_moments_reference, use_kernel  # noqa: E402
from moepress.calibrate.stats import CalibrationStats, LayerStats  # noqa: E402
from moepress.models import get_adapter  # noqa: E402
from moepress.testing import randomize_routers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import SHAPES as SCALE_SHAPES  # noqa: E402

# the published DeepSeek-V2-Lite config (15.7B parameters, 64 routed experts top-6, 2 shared) and a
# CPU-sized one that checks the script ("tiny"), shared with the scale benchmark
SHAPES = {"dsv2-lite": SCALE_SHAPES["dsv2-lite"], "tiny": SCALE_SHAPES["smoke"]}
PATHS = ("forward", "per_expert", "hooked", "fused")


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The shape's model with random weights, built directly on `device` (no checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    randomize_routers(model)  # routing far from uniform whatever the family's init
    return model.eval()


def forward_flops_per_token(model: torch.nn.Module, seq_len: int) -> dict[str, float]:
    """Analytic forward FLOPs per calibration token (see the module docstring)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    cfg = model.config
    active = 0.0
    for i, layer in enumerate(adapter.layers(model)):
        total = sum(p.numel() for p in layer.parameters())
        if i in blocks:
            routed = sum(p.numel() for p in blocks[i].experts.module.parameters())
            total += routed * (blocks[i].top_k / blocks[i].num_experts - 1)
        active += total
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qk = getattr(cfg, "qk_head_dim", None) or head_dim
    v = getattr(cfg, "v_head_dim", None) or head_dim
    attention = cfg.num_hidden_layers * heads * (qk + v) * (seq_len + 1)
    return {"active_parameters": active, "flops_per_token": 2 * active + attention,
            "attention_score_flops_per_token": attention}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_forward_only(model: torch.nn.Module, inputs: LayerInputs, device: torch.device) -> None:
    for layer in get_adapter(model).layers(model):
        run_layer(layer, inputs, device)


def one_run(model, ids, path: str, batch_size: int, device: torch.device, cache: torch.device):
    """(layer seconds, capture seconds, statistics or None) of one calibration over `ids`."""
    _sync(device)
    t = time.perf_counter()
    inputs = capture_inputs(model, ids, batch_size, device=device, storage=cache)
    _sync(device)
    capture = time.perf_counter() - t
    t = time.perf_counter()
    stats = None
    if path == "forward":
        run_forward_only(model, inputs, device)
    else:
        stats = calibrate(model, ids, batch_size=batch_size, device=device, inputs=inputs, stats_path=path).stats
    _sync(device)
    return time.perf_counter() - t, capture, stats


def first_moe_input(model, ids: torch.Tensor, device: torch.device):
    """(first MoE block, the real hidden states [B, T, H] entering it for `ids`)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    first = min(adapter.moe_layer_ids(model))
    inputs = capture_inputs(model, ids, ids.shape[0], device=device, storage=device)
    for i in range(first):
        run_layer(layers[i], inputs, device)
    block = adapter.block(first, layers[first])
    seen = {}
    handle = block.module.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        run_layer(layers[first], inputs, device, replace=False)
    finally:
        handle.remove()
    return block, seen["x"]


MOMENTS = {"kernel": segment_moments, "torch": segment_moments_reference}  # the shifted output moments


def block_breakdown(block, x: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Milliseconds per call of each piece of the first MoE block on one calibration batch, the
    statistics with the moments kernel and with torch ops, and whether the fused forward equals the model's
    own block bit for bit: where the time goes, and what to try next."""

    def timed(fn) -> float:
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        return 1e3 * (time.perf_counter() - t) / repeats

    def fresh() -> LayerStats:
        return LayerStats(block.layer_idx, block.num_experts, block.hidden_size, block.top_k)

    x2d = x.reshape(-1, block.hidden_size)
    with torch.no_grad():
        route = block.route(x2d)
        routes = stats_module.route_experts(block, x2d, route)
        out = {
            "rows": int(route.index.numel()),
            "model_block_ms": timed(lambda: block.module(x)),
            "fused_block_ms": timed(lambda: forward_collecting(block, fresh(), x)),
            "route_ms": timed(lambda: block.route(x2d)),
            "sort_gather_grouped_experts_ms": timed(lambda: stats_module.route_experts(block, x2d, route)),
            "combine_ms": timed(lambda: routes.combine(x2d.shape[0], x2d.dtype)),
            "shared_ms": timed(lambda: block.shared_out(x)),
        }
        default = stats_module.segment_moments
        try:  # the Triton kernel (where it runs) vs the same moments in torch ops
            for name, fn in MOMENTS.items():
                stats_module.segment_moments = fn
                out[f"statistics_ms[{name}]"] = timed(lambda: fresh().add_routes(route, routes))
        finally:
            stats_module.segment_moments = default
        out["moments_kernel_used"] = use_kernel(routes.outputs)
        out["fused_output_bit_equal"] = bool(torch.equal(forward_collecting(block, fresh(), x), block.module(x)))
    return out


def max_relative_difference(a: CalibrationStats, b: CalibrationStats) -> dict[str, float]:
    """Per statistic, max over layers of max |a − b| / max |b| (how far two paths' statistics are)."""
    out: dict[str, float] = {}
    for name in ("count", "weight_sum", "weighted_norm_sum", "out_mean", "out_m2"):
        diffs = []
        for i in a.layers:
            x, y = getattr(a[i], name), getattr(b[i], name)
            diffs.append(float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)))
        out[name] = max(diffs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dsv2-lite")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("-n", type=int, default=256, help="calibration sequences (tokens = n × seq-len)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per layer forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--cache", choices=["device", "cpu"], default="device",
                    help="where the hidden states between layers are kept")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak (H200 bf16: 989)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()

    device = torch.device(args.device)
    cache = device if args.cache == "device" else torch.device("cpu")
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    build_s = time.perf_counter() - t
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (args.n, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    flops = forward_flops_per_token(model, args.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape} on {device_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters "
          f"(built in {build_s:.0f} s), {tokens:,} tokens, {flops['flops_per_token'] / 1e9:.2f} GFLOP/token "
          f"forward", flush=True)

    warm = ids[: args.batch_size]
    for path in paths:  # first calls pay for kernel selection and allocator growth
        one_run(model, warm, path, args.batch_size, device, cache)

    rows, last_stats = {}, {}
    for path in paths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, captures = [], []
        for _ in range(args.repeats):
            s, c, stats = one_run(model, ids, path, args.batch_size, device, cache)
            seconds.append(s)
            captures.append(c)
            last_stats[path] = stats
        median = statistics.median(seconds)
        achieved = tokens * flops["flops_per_token"] / median
        rows[path] = {
            "seconds": seconds, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
            "capture_median_s": statistics.median(captures),
            "tokens_per_s": tokens / median,
            "achieved_tflops": achieved / 1e12,
            "fraction_of_peak": achieved / (args.peak_tflops * 1e12),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        r = rows[path]
        print(f"  {path:<10} median {median:8.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}; capture "
              f"{r['capture_median_s']:.2f} s)  {r['tokens_per_s']:>10,.0f} tokens/s  "
              f"{r['achieved_tflops']:7.1f} TFLOP/s  {100 * r['fraction_of_peak']:5.1f}% of peak", flush=True)

    result = {
        "shape": args.shape, "device": device_name, "dtype": args.dtype, "tokens": tokens,
        "sequences": args.n, "seq_len": args.seq_len, "batch_size": args.batch_size, "cache": args.cache,
        "repeats": args.repeats, "peak_tflops": args.peak_tflops, "build_s": build_s, **flops,
        "paths": rows,
        "first_moe_block": block_breakdown(*first_moe_input(model, ids[: args.batch_size], device), device,
                                           repeats=10),
        "torch": torch.__version__,
    }
    if "fused" in rows and "per_expert" in rows:
        result["speedup_fused_over_per_expert"] = rows["per_expert"]["median_s"] / rows["fused"]["median_s"]
        result["stats_difference_fused_vs_per_expert"] = max_relative_difference(
            last_stats["fused"], last_stats["per_expert"])
    if "fused" in rows and "forward" in rows:
        result["fused_over_forward_only"] = rows["fused"]["median_s"] / rows["forward"]["median_s"]
    print(json.dumps({k: v for k, v in result.items() if k != "paths"}, indent=1))

    args.out.mkdir(parents=True, exist_ok=True)
    tag = device_name.replace(" ", "_").replace("/", "_")
    name = f"calibration_throughput_{args.shape}_{tag}{'_' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
