"""Why HC-SMoE loses to random pruning on the bundled mini checkpoints (issue 24, point 2).

One calibration pass on calib.txt (statistics + the 512 sampled MoE-layer inputs per layer the
merging methods read), then, for every ratio, plans built from explicit expert groupings and
measured on held-out dev.txt (perplexity and JS divergence to the original):

- baselines: `random` and `frequency` pruning (registered methods);
- HC-SMoE groupings: feature = mean expert output over ALL sampled tokens (`all`) or the mean over
  routed calibration tokens only (`routed`, `LayerStats.out_mean`); distance cosine or euclidean
  (the reference code's); linkage average (the paper's), single or complete; with or without a
  bound on cluster size;
- the same grouping by random clusters of the same sizes (`random-groups`);
- each grouping applied three ways: `merge, representative row` (frequency-weighted average of the
  members, only the router row of the most frequently routed member stays: `--hp
  router=representative`), `merge, all rows` (the same weights, every member's router row routes to
  the merged expert, as the reference: `router=all-rows`) and `prune` (the same groups, the most
  frequently routed member kept as it is, the others and their rows removed: no averaging).

Per-layer cluster sizes (largest first) are printed and stored.

    python bench/hc_smoe_diagnosis.py --model dsv2-mini            # ~ minutes on 2 CPU cores
    python bench/hc_smoe_diagnosis.py --model olmoe-mini --ratios 0.25

Writes bench/results/hc_smoe_diagnosis_<model>_<tag>.json (tag: cpu by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import ROOT, SHARED, dev_logits, environment, measure, reference_measure

from moepress.calibrate import calibrate
from moepress.data import load_tokens
from moepress.methods import get_method
from moepress.methods.base import Selection, to_plan
from moepress.methods.hc_smoe import most_frequent
from moepress.methods.merging import (
    SAMPLED_INPUTS,
    agglomerate,
    cosine_distance,
    euclidean_distance,
    kept_count,
    mean_outputs,
    merged_experts,
    selection,
)
from moepress.models import get_adapter
from moepress.models.loading import load_model
from moepress.pipeline import calibration_tokens
from moepress.plan import model_fingerprint
from moepress.surgery import apply_plan

DEV_SEED = 1
DISTANCES = {"cosine": cosine_distance, "euclidean": euclidean_distance}
# (name, feature, distance, linkage, bounded, applied): the groupings compared and how each is applied
ALL_WAYS = ("merge, representative row", "merge, all rows", "prune")
BOTH, MERGE = ALL_WAYS, ALL_WAYS[1:2]
GROUPINGS = (
    ("hc-smoe (moepress: all/cosine/average)", "all", "cosine", "average", False, BOTH),
    ("reference (all/euclidean/average)", "all", "euclidean", "average", False, BOTH),
    ("all/cosine/single", "all", "cosine", "single", False, MERGE),
    ("all/cosine/complete", "all", "cosine", "complete", False, MERGE),
    ("all/euclidean/complete", "all", "euclidean", "complete", False, MERGE),
    ("routed/cosine/average", "routed", "cosine", "average", False, MERGE),
    ("routed/euclidean/average", "routed", "euclidean", "average", False, MERGE),
    ("all/cosine/average, size <= ceil(E/E')", "all", "cosine", "average", True, BOTH),
    ("reference, size <= ceil(E/E')", "all", "euclidean", "average", True, BOTH),
)


def random_groups(sizes: list[int], n: int, seed: int) -> list[list[int]]:
    """A seeded random partition of range(n) into groups of the given sizes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, at = [], 0
    for s in sizes:
        out.append(sorted(perm[at:at + s]))
        at += s
    return sorted(out)


def grouping_selection(stats, groups: dict[int, list[list[int]]], how: str) -> Selection:
    """`how`: one of ALL_WAYS. The representative is the most frequently routed member."""
    reps = {i: [most_frequent(stats[i].frequency, g) for g in gs] for i, gs in groups.items()}
    merge = how.startswith("merge")
    merges = {i: merged_experts(groups[i], reps[i], stats[i].frequency) if merge else [] for i in groups}
    scores = {i: [float(v) for v in stats[i].frequency.double()] for i in groups}
    router = "all-rows" if how == "merge, all rows" else "representative"
    return selection(groups, reps, merges, scores, score_name="frequency", router=router)


def largest_cluster(groups: list[list[int]], features: torch.Tensor, frequency: torch.Tensor) -> dict:
    """The largest group: its size, the mean rank of its members' mean-output norms (0 = the smallest
    output of the layer) and the share of routed slots its members receive."""
    big = max(groups, key=len)
    rank = features.norm(dim=-1).argsort().argsort().double()
    return {"size": len(big), "mean_norm_rank": float(rank[big].mean()),
            "routed_share": float(frequency.double()[big].sum())}


def sizes_of(groups: dict[int, list[list[int]]]) -> dict[str, list[int]]:
    return {str(i): sorted((len(g) for g in gs), reverse=True) for i, gs in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dsv2-mini")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib", type=int, nargs=2, default=[64, 256], metavar=("N", "LEN"))
    ap.add_argument("--dev", type=int, nargs=2, default=[32, 256], metavar=("N", "LEN"))
    ap.add_argument("--random-seeds", type=int, default=2, help="seeds of random pruning / random groups")
    ap.add_argument("--sizes-only", action="store_true", help="print the cluster sizes, measure nothing")
    ap.add_argument("--only", nargs="*", default=None, help="measure only variants whose name holds one of these")
    ap.add_argument("--cache", default=None, help="file to keep the calibration in between runs")
    ap.add_argument("--append", action="store_true",
                    help="add to the rows of an existing results file (same sizes), replacing same variant+ratio")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    path, data = SHARED / "models" / args.model, SHARED / "data"
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, dtype="float32", device=device)
    calib = calibration_tokens(model, tokenizer, str(data / "calib.txt"), args.calib[0], args.calib[1], seed=0)
    meta = {"model_fingerprint": model_fingerprint(model), "data": "calib.txt",
            "data_fingerprint": calib.fingerprint, "seed": 0}
    key = (args.model, tuple(args.calib), calib.fingerprint)
    cached = torch.load(args.cache, weights_only=False) if args.cache and Path(args.cache).exists() else None
    if cached is not None and cached["key"] == key:
        stats, moe_inputs = cached["stats"], cached["moe_inputs"]
    else:
        res = calibrate(model, calib.input_ids, batch_size=args.batch_size, keep_moe_inputs=SAMPLED_INPUTS,
                        device=device, meta=meta, seed=0)
        stats, moe_inputs = res.stats, res.moe_inputs
        if args.cache:
            torch.save({"key": key, "stats": stats, "moe_inputs": moe_inputs}, args.cache)
    blocks = get_adapter(model).blocks(model)
    dev = load_tokens(tokenizer, data / "dev.txt", args.dev[0], args.dev[1], seed=DEV_SEED).input_ids
    reference = dev_logits(model, dev, args.batch_size, device)
    base = reference_measure(dev, reference, args.batch_size)
    print(f"{args.model}: calibration {tuple(calib.input_ids.shape)}, dev {tuple(dev.shape)}, "
          f"original ppl {base['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")

    feats = {"all": {i: mean_outputs(blocks[i], moe_inputs[i]) for i in stats.layers},
             "routed": {i: stats[i].out_mean.double() for i in stats.layers}}
    rows: list[dict] = []
    sizes: dict[float, dict] = {r: {} for r in args.ratios}
    largest: dict[float, dict] = {r: {} for r in args.ratios}

    def run(name: str, ratio: float, plan, groups=None, **extra) -> dict | None:
        if args.sizes_only or (args.only is not None and not any(o in name for o in args.only)):
            return None
        try:
            m = measure(apply_plan(copy.deepcopy(model), plan), dev, reference, args.batch_size, device)
        except Exception as err:  # noqa: BLE001 - recorded, the other variants stand
            rows.append({"variant": name, "ratio": ratio, "error": f"{type(err).__name__}: {err}"[:300]})
            print(f"  {ratio:<5} {name:<58} FAILED {rows[-1]['error']}", flush=True)
            return None
        row = {"variant": name, "ratio": ratio, **m, **extra}
        if groups is not None:
            row["group_sizes"] = sizes_of(groups)
            row["largest_group"] = max(max(s) for s in row["group_sizes"].values())
        rows.append(row)
        print(f"  {ratio:<5} {name:<58} ppl {m['ppl']:8.2f}  JS {m['js']:.4f}"
              + (f"  largest group {row['largest_group']}" if groups is not None else ""), flush=True)
        return row

    for ratio in args.ratios:
        n_keep = {i: kept_count(stats[i], ratio) for i in stats.layers}
        for seed in range(args.random_seeds):
            run(f"random prune (seed {seed})", ratio, get_method("random")(stats, ratio, seed=seed), seed=seed)
        run("frequency prune", ratio, get_method("frequency")(stats, ratio))
        ref_groups = None
        for name, feature, dist, link, bounded, applied in GROUPINGS:
            groups = {}
            for i in sorted(stats.layers):
                cap = -(-stats[i].num_experts // n_keep[i]) if bounded else None
                groups[i] = agglomerate(DISTANCES[dist](feats[feature][i]), n_keep[i], link, max_size=cap)
            ref_groups = ref_groups or groups
            print(f"  cluster sizes per layer ({name}, ratio {ratio}):")
            for i, s in sizes_of(groups).items():
                print(f"    layer {i}: {s}")
            sizes[ratio][name] = sizes_of(groups)
            largest[ratio][name] = {str(i): largest_cluster(groups[i], feats["all"][i], stats[i].frequency)
                                    for i in sorted(groups)}
            print("    largest cluster per layer: mean rank of its members' mean-output norm (0 = smallest of "
                  f"{stats[min(groups)].num_experts}), its share of routed slots: "
                  + ", ".join(f"{v['mean_norm_rank']:.1f}/{v['routed_share']:.2f}"
                              for v in largest[ratio][name].values()))
            for how in applied:
                sel = grouping_selection(stats, groups, how)
                run(f"{name}: {how}", ratio, to_plan("hc-smoe", stats, sel, {"ratio": ratio}), groups,
                    grouping=name, applied=how)
        for seed in range(args.random_seeds if args.only is None else 1):
            groups = {i: random_groups([len(g) for g in ref_groups[i]], stats[i].num_experts, 1000 * seed + i)
                      for i in sorted(stats.layers)}
            for how in ALL_WAYS:
                sel = grouping_selection(stats, groups, how)
                run(f"random-groups, hc-smoe sizes (seed {seed}): {how}", ratio,
                    to_plan("hc-smoe", stats, sel, {"ratio": ratio}), groups, grouping="random-groups",
                    applied=how, seed=seed)

    out = {
        "model": args.model,
        "calibration_tokens": list(calib.input_ids.shape),
        "sampled_inputs_per_layer": SAMPLED_INPUTS,
        "dev_tokens": list(dev.shape),
        "original": base,
        "rows": rows,
        "group_sizes": {str(r): v for r, v in sizes.items()},
        "largest_group": {str(r): v for r, v in largest.items()},
        "seconds": time.perf_counter() - t0,
        "environment": environment(device),
    }
    if args.sizes_only and not args.append:
        return
    dest = ROOT / "bench" / "results" / f"hc_smoe_diagnosis_{args.model}_{args.tag}.json"
    if args.append and dest.exists():
        earlier = json.loads(dest.read_text())
        assert earlier["calibration_tokens"] == out["calibration_tokens"] and earlier["dev_tokens"] == out["dev_tokens"]
        new = {(r["variant"], r["ratio"]) for r in rows}
        out["rows"] = [r for r in earlier["rows"] if (r["variant"], r["ratio"]) not in new] + rows
        out["commands"] = earlier.get("commands", [earlier["environment"]["command"]]) + [out["environment"]["command"]]
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest.relative_to(ROOT)} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
