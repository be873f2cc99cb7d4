"""vLLM generation throughput of a mini checkpoint and each moepress output kind of it, side by side.

Each kind is compressed into a scratch folder (small calibration: this measures serving speed, not
quality), served by vLLM (with moepress's plugin) in this process, and timed at batch 1 and batch 16 with
fixed prompt and generation lengths (random prompt ids, `ignore_eos`). Prints a table, writes JSON.

    python bench/vllm_throughput.py --model ../shared/models/qwen2moe-mini --out bench/results/vllm_throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: fast start, one timer
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "calib.txt"
# kind -> (method, arguments)
KINDS = {
    "uniform-prune": ("frequency", {"ratio": 0.25}),
    "merge": ("hc-smoe", {"ratio": 0.25}),
    "mone": ("mone", {"ratio": 0.25}),
    "zero-novice": ("mone-zero-novice", {"ratio": 0.25}),
    "cd-moe-s": ("cd-moe-s", {"layers": 2}),
    "cd-moe-sr": ("cd-moe-sr", {"layers": 2}),
    "layer-drop": ("layer-drop", {"layers": 2}),
}


def compress_all(model: Path, kinds: list[str], scratch: Path) -> dict[str, Path]:
    """The original and each kind's output folder, by kind."""
    import moepress

    folders = {"original": model}
    for kind in kinds:
        method, kwargs = KINDS[kind]
        out = scratch / kind
        moepress.compress(model, method, out, data=DATA, n=8, seq_len=64, overwrite=True, **kwargs)
        folders[kind] = out
    return folders


def throughput(folder: Path, batches: list[int], prompt_len: int, gen_len: int, repeats: int) -> dict[str, float]:
    """Generated tokens per second at each batch size (best of `repeats`), and the engine's start time."""
    import torch
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=prompt_len + gen_len + 16,
        max_num_seqs=max(batches),
        disable_log_stats=True,
        seed=0,
    )
    result = {"startup_s": time.perf_counter() - start}
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    for b in batches:
        prompts = [{"prompt_token_ids": torch.randint(vocab, (prompt_len,), generator=g).tolist()} for _ in range(b)]
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t)
            assert all(len(o.outputs[0].token_ids) == gen_len for o in outs)
        result[f"batch{b}_tok_s"] = b * gen_len / best
    del llm
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "qwen2moe-mini")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_throughput.json")
    args = parser.parse_args()

    import vllm

    with tempfile.TemporaryDirectory(prefix="moepress-vllm-bench-") as scratch:
        folders = compress_all(args.model, args.kinds, Path(scratch))
        rows = {k: throughput(f, args.batches, args.prompt_len, args.gen_len, args.repeats) for k, f in folders.items()}

    cols = [f"batch{b}_tok_s" for b in args.batches]
    print(f"\n{args.model.name}: prompt {args.prompt_len}, generate {args.gen_len}, float32, vLLM {vllm.__version__}")
    print(f"{'kind':<15}" + "".join(f"{c:>16}" for c in cols) + f"{'vs original':>14}{'startup_s':>11}")
    for kind, r in rows.items():
        ratio = r[cols[-1]] / rows["original"][cols[-1]]
        print(f"{kind:<15}" + "".join(f"{r[c]:>16.1f}" for c in cols) + f"{ratio:>13.2f}x{r['startup_s']:>11.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(args.model),
        "vllm": vllm.__version__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
