"""CD-MoE's search on a CPU: wall time of `moepress compress MODEL --method cd-moe-sr --layers 2
--experts 2 -n 32 --seq-len 256` with the default (reference) settings, and where the time goes.

The default search is exact, not an approximation: the reference's expert search scores each
candidate at the condensed layer's own output (hidden-dimension JS), so a candidate costs one expert
term and one softmax, no later layer; the layer search runs only the layers after a candidate.
`--variant` times moepress's next-token variant (`metric=vocab-js`) for comparison.

    python bench/cd_moe_cpu.py [--model dsv2-mini] [--threads 2] [--variant] [--out bench/results/cd_moe_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import SHARED, environment

from moepress.data import load_documents
from moepress.methods.cd_moe import cd_moe
from moepress.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dsv2-mini")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--variant", action="store_true", help="also time metric=vocab-js, weight_mode=all")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cd_moe_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = SHARED / "models" / args.model
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    ids = load_documents(tokenizer, SHARED / "data" / "calib.txt", args.n, args.seq_len).input_ids
    load_s = time.perf_counter() - t0
    runs = {"reference (default)": {}}
    if args.variant:
        runs["vocab-js, weights over all tokens"] = {"metric": "vocab-js", "weight_mode": "all"}
    results = {}
    for name, hp in runs.items():
        t = time.perf_counter()
        plan = cd_moe(model, ids, layers=args.layers, experts=args.experts, device="cpu", **hp)
        seconds = time.perf_counter() - t
        results[name] = {
            "seconds": seconds,
            "order": plan.metadata["order"],
            "experts": {k: v["order"] for k, v in plan.metadata["experts"].items()},
            "forward_passes": plan.metadata["forward_passes"],
        }
        print(f"{name}: {seconds:.1f} s search, layers {plan.metadata['order']}")
    out = {
        "bench": "cd_moe_cpu",
        "model": args.model,
        "settings": {"n": args.n, "seq_len": args.seq_len, "layers": args.layers, "experts": args.experts},
        "load_and_tokenise_seconds": load_s,
        "runs": results,
        "environment": environment(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
