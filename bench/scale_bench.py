"""Scale benchmark: calibrate a full-size, random-initialised MoE streamed layer by layer from disk.

(a) DeepSeek-V2-Lite shape (15.7B, 31 GB bf16) on one GPU: peak GPU memory vs model size.
(b) Qwen2-57B-A14B shape (57B, 114 GB in bf16) on one H100 (80 GB): the model cannot fit, streaming
    runs it. The device machines have 64 GB of disk, so its weights are stored as float8_e4m3
    (57 GB) and upcast to bf16 per layer as they are read; computation is bf16 throughout.
(c) the same calibration on 1 vs N GPUs (`torchrun --nproc-per-node N bench/scale_bench.py ...`).

Weights are random (statistics' cost does not depend on their values); they are written straight
from the meta-device skeleton's parameter shapes, one shard per decoder layer, without ever
building the model in memory.

    python bench/scale_bench.py --shape dsv2-lite --dir /tmp/dsv2lite        # writes then calibrates
    torchrun --nproc-per-node 2 bench/scale_bench.py --shape dsv2-lite --dir /tmp/dsv2lite --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moepress.calibrate import distributed  # noqa: E402
from moepress.calibrate.runner import calibrate, capture_inputs, run_layer  # noqa: E402
from moepress.calibrate.streaming import Streamer  # noqa: E402

SHAPES = {
    # published configs (hidden sizes, expert counts, attention dims), random weights
    "dsv2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        head_dim=64, routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "smoke": dict(  # seconds on a CPU: checks the script, measures nothing
        model_type="deepseek_v2", vocab_size=512, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "qwen2-57b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=18944,
        moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
}


def make_config(shape: str):
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def write_random_checkpoint(shape: str, folder: Path, store_dtype: torch.dtype, device: str) -> dict:
    """One safetensors shard per decoder layer (plus one for the rest), random N(0, 0.02) values."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in skeleton.named_parameters():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = p.shape
    weight_map, total = {}, 0
    g = torch.Generator(device=device).manual_seed(0)
    for key, params in sorted(groups.items()):
        tensors = {}
        for name, shp in params.items():
            t = torch.randn(shp, generator=g, device=device, dtype=torch.bfloat16) * 0.02
            if name.endswith("norm.weight"):
                t = torch.ones(shp, device=device, dtype=torch.bfloat16)
            tensors[name] = t.to(store_dtype).cpu()
            total += t.numel()
        shard = f"model-{key}.safetensors"
        save_file(tensors, str(folder / shard))
        weight_map.update({n: shard for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    return {"parameters": total, "bf16_bytes": 2 * total}


def largest_layer(streamer: Streamer) -> tuple[int, int]:
    """(index, bf16 bytes) of the decoder layer with the most parameters."""
    sizes = [sum(p.numel() * 2 for p in layer.parameters()) for layer in streamer.layers]
    return max(range(len(sizes)), key=sizes.__getitem__), max(sizes)


def forward_working_set(streamer: Streamer, ids: torch.Tensor, index: int, device: torch.device) -> int:
    """GPU bytes a plain forward of one calibration batch through layer `index` needs beyond its
    weights: the "activations" the peak is compared with (attention scores, expert intermediates)."""
    if device.type != "cuda":
        return 0
    inputs = capture_inputs(streamer.model, ids, ids.shape[0], device=streamer.rest_device)
    layer = streamer.load_layer(index)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_layer(layer, inputs, device, replace=False, index=index)
    torch.cuda.synchronize(device)
    work = torch.cuda.max_memory_allocated(device) - base
    streamer.release_layer(index)
    return work


def first_experts_plan(source: Path):
    """Keep the first 75% of routed experts of every MoE layer (needs no statistics)."""
    from moepress.calibrate.streaming import build_skeleton
    from moepress.plan import CompressionPlan, Prune

    model, adapter = build_skeleton(source)
    layers = adapter.layers(model)
    keep = {i: adapter.block(i, layers[i]).num_experts * 3 // 4 for i in adapter.moe_layer_ids(model)}
    return CompressionPlan(method="frequency", layers={i: Prune(keep_experts=list(range(k))) for i, k in keep.items()})


def stream_write(source: Path, stats, out: Path, plan=None) -> dict:
    """Plan a 25% frequency prune and write it with the streamed writer: wall time, output bytes and
    peak host memory while writing, sampled from /proc: anonymous memory (what the process holds)
    and total RSS (which also counts the memory-mapped shard pages, reclaimable page cache)."""
    import shutil
    import threading

    from moepress.io.stream_save import save_compressed_streaming
    from moepress.methods import get_method

    shutil.rmtree(out, ignore_errors=True)
    base = _anon_bytes()
    plan = plan or get_method("frequency")(stats, 0.25)
    peaks = {"RssAnon": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    save_compressed_streaming(source, plan, out, dtype=torch.bfloat16)
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"stream-wrote a 25% prune: {written / 2**30:.1f} GiB in {wall:.0f} s (anonymous memory before: "
          f"{base / 2**30:.2f} GiB), peak host "
          f"anonymous memory {peaks['RssAnon'] / 2**30:.2f} GiB (RSS incl. mapped shards "
          f"{peaks['VmRSS'] / 2**30:.2f} GiB)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"stream_write_s": wall, "stream_written_bytes": written,
            "host_anon_bytes_before": base, "peak_host_anon_bytes": peaks["RssAnon"],
            "peak_host_rss_bytes": peaks["VmRSS"]}


def _anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dsv2-lite")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--store-dtype", choices=["bfloat16", "float8_e4m3fn"], default="bfloat16")
    ap.add_argument("--no-write", action="store_true", help="reuse the checkpoint in --dir")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. the device kind)")
    ap.add_argument("--write-out", type=Path, default=None,
                    help="also prune 25%% of experts (frequency) and stream-write the output here (rank 0)")
    ap.add_argument("--write-first", action="store_true",
                    help="with --write-out: stream-write a statistics-free 25%% prune before calibrating, "
                         "so the writer's host memory is measured in a process that has done nothing else")
    args = ap.parse_args()

    rank, world = distributed.world()
    device = distributed.init_if_needed() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {}
    if not args.no_write and rank == 0:
        t = time.perf_counter()
        info = write_random_checkpoint(args.shape, args.dir, getattr(torch, args.store_dtype), str(device))
        info["write_s"] = time.perf_counter() - t
        print(f"wrote {args.shape}: {info['parameters'] / 1e9:.2f}B parameters in {info['write_s']:.0f}s", flush=True)
    if world > 1:
        torch.distributed.barrier()
    first = {}
    if rank == 0 and args.write_out is not None and args.write_first:
        first = {f"first_{k}": v for k, v in stream_write(args.dir, None, args.write_out,
                                                          first_experts_plan(args.dir)).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    streamer = Streamer(args.dir, device, torch.bfloat16)
    params = sum(p.numel() for p in streamer.model.parameters())
    cfg = streamer.model.config
    ids = torch.randint(0, cfg.vocab_size, (args.n, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = distributed.shard(ids, rank, world)
    t = time.perf_counter()
    result = calibrate(streamer.model, ids, batch_size=args.batch_size, device=device, stream=streamer)
    stats = distributed.all_merge(result.stats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    big, layer_bytes = largest_layer(streamer)
    batch_act = forward_working_set(streamer, ids[: args.batch_size], big, device)
    row = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": world,
        "store_dtype": args.store_dtype,
        "parameters": params,
        "model_bf16_bytes": 2 * params,
        "largest_layer_bf16_bytes": layer_bytes,
        "calibration_tokens": args.n * args.seq_len,
        # activations: what a plain bf16 forward of one batch through the largest layer needs
        "batch_activation_bytes": batch_act,
        "peak_gpu_bytes": peak,
        "peak_over_layer_plus_activations": peak / (layer_bytes + batch_act) if peak else None,
        "calibration_wall_s": wall,
        "read_wait_s": streamer.read_wait_s,  # compute idle, waiting for layer reads (rank 0)
        "moe_layers": len(stats.layers),
        **info,
    }
    if rank == 0 and args.write_out is not None:
        row.update(first)
        row.update(stream_write(args.dir, stats, args.write_out))
    if rank == 0:
        gib = 2**30
        print("| shape | GPUs | model bf16 | largest layer | batch activations | peak GPU | peak/(layer+act) "
              "| calib wall | of which waiting for disk |")
        print(f"| {row['shape']} | {world} × {row['device']} | {row['model_bf16_bytes'] / gib:.1f} GiB | "
              f"{layer_bytes / gib:.2f} GiB | {batch_act / gib:.2f} GiB | {peak / gib:.2f} GiB | "
              f"{row['peak_over_layer_plus_activations'] or 0:.2f} | {wall:.1f} s | {streamer.read_wait_s:.1f} s |")
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"scale_{args.shape}_{world}gpu{'_' + args.tag if args.tag else ''}.json"
        (args.out / name).write_text(json.dumps(row, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], name).write_text(json.dumps(row, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
