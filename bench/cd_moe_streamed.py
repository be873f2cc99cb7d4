"""Streamed CD-MoE search: the greedy search on a full-size, random-initialised MoE with one decoder
layer on the GPU at a time, read from safetensors (`moepress.methods.streamed_search`).

Reference defaults (CD-MoE-SR, k = the model's top-k, hidden-dimension JS, routed-mean weights) on
100 documents × 256 random tokens (values do not change the cost). Reports search wall time and each
sweep's, layer forwards (compute, the in-memory search's count) and layer reads from disk (one per
layer per sweep), the naive count, peak GPU memory against the largest layer and the cached states.

    python bench/cd_moe_streamed.py --shape dsv2-lite --dir /tmp/dsv2lite --layers 6     # writes, then searches
    python bench/cd_moe_streamed.py --shape dsv2-lite --dir /tmp/dsv2lite --no-write --layers 13
    python bench/cd_moe_streamed.py --shape qwen2-57b --dir /tmp/q57 --store-dtype float8_e4m3fn --write-only
    python bench/cd_moe_streamed.py --shape qwen2-57b --dir /tmp/q57 --no-write --layers 1
    python bench/cd_moe_streamed.py --shape tiny --device cpu --dir /tmp/tiny --check    # seconds; checks the script

`--check` (small shapes) also runs the in-memory search and asserts the same plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_bench import largest_layer, write_random_checkpoint  # noqa: E402

from moepress.calibrate.streaming import Streamer  # noqa: E402
from moepress.methods.cd_moe import cd_moe  # noqa: E402

SHAPE_NAMES = {"dsv2-lite": "dsv2-lite", "qwen2-57b": "qwen2-57b", "tiny": "smoke"}


def cached_state_bytes(streamer: Streamer, tokens: int, moe_layers: int, itemsize: int) -> int:
    """Bytes the search keeps besides the running layer: x and h_mid of every candidate layer, one
    hidden state per in-flight candidate (at most one per MoE layer), the layer-0 inputs."""
    hidden = streamer.model.config.hidden_size
    return (3 * moe_layers + 1) * tokens * hidden * itemsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="dsv2-lite")
    ap.add_argument("--dir", type=Path, required=True, help="checkpoint folder (written unless --no-write)")
    ap.add_argument("--store-dtype", choices=["bfloat16", "float8_e4m3fn", "float32"], default=None,
                    help="weights on disk [bfloat16; float32 on CPU]")
    ap.add_argument("--no-write", action="store_true", help="reuse the checkpoint in --dir")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    ap.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    ap.add_argument("-n", type=int, default=None, help="documents [100; tiny: 8]")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per document [256; tiny: 32]")
    ap.add_argument("--layers", type=int, default=None, help="MoE layers to condense [6; tiny: 1]")
    ap.add_argument("--experts", type=int, default=None, help="routed experts kept [the model's top-k]")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--storage", default=None, help="where cached states live [the device]; cpu saves GPU memory")
    ap.add_argument("--check", action="store_true", help="also search in memory and compare (small shapes)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. the device kind)")
    args = ap.parse_args()
    tiny = args.shape == "tiny"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    store = getattr(torch, args.store_dtype) if args.store_dtype else dtype
    n, seq_len = args.n or (8 if tiny else 100), args.seq_len or (32 if tiny else 256)
    layers = args.layers or (1 if tiny else 6)

    info: dict = {}
    if not args.no_write:
        t = time.perf_counter()
        info = write_random_checkpoint(SHAPE_NAMES[args.shape], args.dir, store, str(device))
        info["write_s"] = time.perf_counter() - t
        print(f"wrote {args.shape}: {info['parameters'] / 1e9:.2f}B parameters in {info['write_s']:.0f} s", flush=True)
        if args.write_only:
            return
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    streamer = Streamer(args.dir, device, dtype)
    cfg = streamer.model.config
    params = sum(p.numel() for p in streamer.model.parameters())
    ids = torch.randint(3, cfg.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))
    bos = cfg.bos_token_id
    ids[:, 0] = bos if bos is not None and bos < cfg.vocab_size else 1  # documents start with BOS
    base = torch.cuda.memory_allocated(device) if cuda else 0
    t = time.perf_counter()
    try:
        plan = cd_moe(streamer.model, ids, layers=layers, experts=args.experts, batch_size=args.batch_size,
                      stream=streamer, storage=args.storage, method="cd-moe-sr")
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        big, layer_bytes = largest_layer(streamer)
        read_wait = streamer.read_wait_s
        moe_layers = len(streamer.adapter.moe_layer_ids(streamer.model))
        itemsize = torch.tensor([], dtype=dtype).element_size()
        cached = cached_state_bytes(streamer, n * seq_len, moe_layers, itemsize)
    finally:
        streamer.close()
    passes = plan.metadata["forward_passes"]
    row = {
        "bench": "cd_moe_streamed",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "store_dtype": str(store).removeprefix("torch."),
        "parameters": params,
        "model_bytes": params * itemsize,
        "largest_layer_bytes": layer_bytes * itemsize // 2,  # largest_layer counts bf16 bytes
        "num_layers": len(streamer.layers),
        "moe_layers": moe_layers,
        "settings": {"method": "cd-moe-sr", "experts": plan.hyperparameters["experts"], "layers": layers,
                     "metric": plan.hyperparameters["metric"], "weight_mode": plan.hyperparameters["weight_mode"],
                     "documents": n, "seq_len": seq_len, "batch_size": args.batch_size,
                     "storage": args.storage or str(device)},
        "search_wall_s": wall,
        "sweep_s": plan.metadata.get("sweep_seconds"),
        "read_wait_s": read_wait,
        "layer_forwards": passes["search_layer_forwards"],
        "layer_loads": passes["layer_loads"],
        "naive_layer_forwards": passes["naive_layer_forwards"],
        "metric_evals": passes["metric_evals"],
        "peak_gpu_bytes": peak,
        "gpu_bytes_before_search": base,
        "cached_state_bytes_estimate": cached,
        "order": plan.metadata["order"],
        "curve": plan.metadata["curve"],
        "bytes_ratio": plan.metadata["memory_ratio"][-1],
        "torch": torch.__version__,
        **info,
    }
    if args.check:
        from transformers import AutoModelForCausalLM

        from moepress.plan import Condense

        model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=dtype)
        memory = cd_moe(model, ids, layers=layers, experts=args.experts, batch_size=args.batch_size,
                        device=device, method="cd-moe-sr")
        same = memory.layers.keys() == plan.layers.keys() and all(
            isinstance(a, Condense) and a.experts == plan.layers[m].experts
            and max(abs(x - y) for x, y in zip(a.weights, plan.layers[m].weights, strict=True)) < 1e-5
            for m, a in memory.layers.items()
        )
        row["same_plan_as_in_memory"] = same
        if not same:
            sys.exit(f"streamed plan {plan.layers} differs from the in-memory plan {memory.layers}")

    gib = 2**30
    print("| shape | device | model | largest layer | documents × tokens | layers condensed | search wall s "
          "| sweep 1 s (+ experts) | layer forwards | layer reads | naive forwards | peak GPU | disk wait s |")
    print(f"| {args.shape} | {row['device']} | {row['model_bytes'] / gib:.1f} GiB | "
          f"{row['largest_layer_bytes'] / gib:.2f} GiB | {n} × {seq_len} | {layers} | {wall:.1f} | "
          f"{(row['sweep_s'] or [0])[0]:.1f} | {row['layer_forwards']:,} | {row['layer_loads']:,} | "
          f"{row['naive_layer_forwards']:,} | {(peak or 0) / gib:.2f} GiB | {read_wait:.1f} |")
    print(f"order {row['order']}; bytes after {row['bytes_ratio']:.3f} of the original"
          + ("; same plan as in memory" if args.check else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"cd_moe_streamed_{args.shape}{'_' + args.tag if args.tag else ''}.json"
    text = json.dumps(row, indent=1)
    (args.out / name).write_text(text)
    if os.environ.get("OUT"):  # the remote device tool brings back what lands here
        Path(os.environ["OUT"], name).write_text(text)
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
