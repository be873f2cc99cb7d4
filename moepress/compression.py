"""`moepress.compress(...)`: load → calibrate (cached) → plan → apply → write, the whole run in one call.

Every run is a `Recipe` (`moepress.recipe`): keyword arguments make a one-method recipe, `recipe=`
loads one from YAML (keyword arguments such as `out`, `device` or `n` then override it). Arguments
are checked before the model loads: first on their own, then against an empty ("meta") copy of the
model built from its config, so a bad ratio or too many layers fail in a second, not after minutes.

The output folder is written whole or not at all (built in a temporary sibling, renamed at the end):
the checkpoint `save_compressed` writes (weights, config, tokenizer, `moepress_plan.json`, manifest)
plus `moepress_stats/` (the calibration statistics), `moepress_recipe.yaml` (the fully resolved
recipe: rerunning it gives a byte-identical plan) and `moepress_run.json` (timings, which are kept
out of the plan so that plans of identical runs are identical). The HTML report is written last.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moepress.errors import MoepressError
from moepress.recipe import RECIPE_FILE, DataSpec, MethodEntry, Recipe, format_layers

STATS_DIR = "moepress_stats"
RUN_FILE = "moepress_run.json"
# Plan metadata that differs between identical runs (wall time); moved to moepress_run.json.
VOLATILE_METADATA = ("search_seconds", "sweep_seconds")


@dataclass
class PlanResult:
    """A plan and what went into it."""

    plan: Any  # CompressionPlan
    stats: Any = None  # CalibrationStats, when calibration ran
    seconds: dict[str, float] = field(default_factory=dict)
    volatile: dict[str, Any] = field(default_factory=dict)  # per entry, what VOLATILE_METADATA held


def compress(
    model_path: str | Path | None = None,
    method: str | None = None,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    ratio: float | None = None,
    layers: int | None = None,
    experts: int | None = None,
    memory_budget: float | None = None,
    n: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool | None = None,
    allow_pickle: bool | None = None,
    hp: dict[str, Any] | None = None,
    recipe: str | Path | Recipe | None = None,
    stream: bool = False,
    quantize: str | None = None,
) -> Path:
    """Compress `model_path` with `method` into the folder `out` and return `out`.

    Statistics methods (mone, frequency, reap, naee, random, ...) take `ratio`, the share of routed
    experts to prune; search methods (cd-moe-sr, alias cd-moe; cd-moe-s; layer-drop) take `layers`
    (how many MoE layers to condense) or `memory_budget` (share of the original bytes to keep) and,
    for cd-moe-sr, `experts` per condensed layer. `hp` holds further hyperparameters of the method.
    `data` is calibration text, cut into `n` sequences of `seq_len` tokens with `seed` (defaults
    128, 512, 0); statistics are reused from the cache ($MOEPRESS_CACHE, else ~/.cache/moepress)
    when the same model, tokens, n and seq_len were calibrated before.

    With `recipe` (a YAML path or a Recipe) the model, data and methods come from the recipe; `out`,
    `data`, `n`, `seq_len`, `seed`, `batch_size`, `device`, `dtype`, `trust_remote_code`,
    `allow_pickle` (load `.bin` weights, with `weights_only=True`) and `model_path` override it,
    and giving a method as well is an error.

    `stream`: calibrate, search and write with one decoder layer in memory at a time, read from the
    checkpoint's safetensors shards (models larger than the GPU or the host memory; `run_recipe`).

    `quantize` (a float input): the output written as compressed-tensors `fp8` (FP8-dynamic), `w4a16`
    (int4, groups of 128), ... (`moepress.quant.export`), loadable by transformers and vLLM.
    """
    r = build_recipe(
        model_path, method, out, data=data, ratio=ratio, layers=layers, experts=experts,
        memory_budget=memory_budget, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device,
        dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, hp=hp, recipe=recipe,
        quantize=quantize,
    )
    return run_recipe(r, overwrite=overwrite, stream=stream)


def build_recipe(
    model_path: str | Path | None = None,
    method: str | None = None,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    ratio: float | None = None,
    layers: int | None = None,
    experts: int | None = None,
    memory_budget: float | None = None,
    n: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool | None = None,
    allow_pickle: bool | None = None,
    hp: dict[str, Any] | None = None,
    recipe: str | Path | Recipe | None = None,
    need_output: bool = True,
    quantize: str | None = None,
) -> Recipe:
    """The checked recipe of a run: from the arguments, or from `recipe` with the arguments as overrides."""
    method_args = {"method": method, "ratio": ratio, "layers": layers, "experts": experts,
                   "memory_budget": memory_budget, "hp": hp}
    if recipe is not None:
        given = [k for k, v in method_args.items() if v is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise MoepressError(f"the recipe names the methods; drop {flags} or drop --recipe")
        r = recipe.model_copy(deep=True) if isinstance(recipe, Recipe) else Recipe.load(recipe)
        if model_path is not None:
            r.model = local_or_name(model_path)
        if data is not None:
            r.data.path = local_or_name(data)
        for key, value in (("n", n), ("seq_len", seq_len), ("seed", seed)):
            if value is not None:
                setattr(r.data, key, value)
        for key, value in (("batch_size", batch_size), ("device", device), ("dtype", dtype),
                           ("trust_remote_code", trust_remote_code), ("allow_pickle", allow_pickle),
                           ("quantize", quantize)):
            if value is not None:
                setattr(r, key, value)
    else:
        missing = [k for k, v in (("MODEL", model_path), ("--method", method), ("--data", data)) if v is None]
        if missing:
            raise MoepressError(f"give {', '.join(missing)} (or a --recipe)")
        spec = DataSpec(path=local_or_name(data), **{k: v for k, v in (("n", n), ("seq_len", seq_len),
                                                                       ("seed", seed)) if v is not None})
        entry = MethodEntry(method=str(method), ratio=ratio, num_layers=layers, experts=experts,
                            memory_budget=memory_budget, hyperparameters=dict(hp or {}))
        settings = {k: v for k, v in (("batch_size", batch_size), ("device", device), ("dtype", dtype),
                                      ("trust_remote_code", trust_remote_code), ("allow_pickle", allow_pickle),
                                      ("quantize", quantize))
                    if v is not None}
        r = Recipe(model=local_or_name(model_path), data=spec, methods=[entry], **settings)
    if out is not None:
        r.output = str(Path(out).expanduser().resolve())
    if r.output is None and need_output:
        raise MoepressError("give an output folder: -o OUT (or output: in the recipe)")
    r.check()
    return r


def plan_for(
    model_path: str | Path,
    method: str,
    *,
    stats: str | Path | None = None,
    data: str | Path | None = None,
    ratio: float | None = None,
    layers: int | None = None,
    experts: int | None = None,
    memory_budget: float | None = None,
    n: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool | None = None,
    allow_pickle: bool | None = None,
    hp: dict[str, Any] | None = None,
    stream: bool = False,
):
    """The CompressionPlan `compress` would apply, without applying it (`moepress plan`).

    Statistics methods decide from `stats` (a folder `moepress calibrate` wrote; the model is not
    loaded) or calibrate on `data` (cached); search methods and naee run the model on `data`.
    `stream`: the model's decoder layers are read from its shards one at a time (`run_recipe`).
    """
    from moepress.calibrate.stats import CalibrationStats
    from moepress.methods.base import get_method, method_is_sequential, method_layer_inputs
    from moepress.models.loading import check_checkpoint, load_model

    if stats is not None and data is not None:
        raise MoepressError("give --stats DIR or --data FILE, not both")
    if stats is not None:
        entry = MethodEntry(method=method, ratio=ratio, num_layers=layers, experts=experts,
                            memory_budget=memory_budget, hyperparameters=dict(hp or {}))
        entry.check()
        if entry.kind == "search":
            raise MoepressError(f"{entry.method} searches on the model: pass --data FILE, not --stats")
        if method_layer_inputs(entry.method):
            raise MoepressError(f"{entry.method} reads expert outputs on sampled tokens: pass --data FILE, not --stats")
        if method_is_sequential(entry.method):
            raise MoepressError(f"{entry.method} re-runs the model layer by layer: pass --data FILE, not --stats")
        if Path(model_path).exists() or str(model_path).startswith((".", "/", "~")):
            check_checkpoint(model_path, bool(allow_pickle))  # not loaded, but a wrong path is still an error
        loaded = CalibrationStats.load(stats)
        return get_method(entry.method)(loaded, entry.ratio, seed=seed or 0, **entry.hyperparameters)
    if data is None:
        raise MoepressError("give --stats DIR (from `moepress calibrate`) or --data FILE to calibrate on")
    r = build_recipe(
        model_path, method, None, data=data, ratio=ratio, layers=layers, experts=experts,
        memory_budget=memory_budget, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device,
        dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, hp=hp, need_output=False,
    )
    tokenizer, batches = preflight(r)
    if stream:
        with streamed_model(r) as streamer:
            return make_plan(streamer.model, tokenizer, r, batches=batches, stream=streamer).plan
    model, _ = load_model(r.model, dtype=r.dtype, device="cpu", trust_remote_code=r.trust_remote_code,
                          allow_pickle=r.allow_pickle)
    return make_plan(model, tokenizer, r, batches=batches).plan


@contextmanager
def streamed_model(r: Recipe):
    """A `Streamer` over the recipe's checkpoint on the recipe's device: its meta-device model reads one
    decoder layer at a time from the safetensors shards (closed on leaving the block)."""
    from moepress.calibrate.streaming import Streamer
    from moepress.models.loading import resolve_device, resolve_dtype

    if not Path(r.model).is_dir():
        raise MoepressError(f"--stream reads a local checkpoint folder; {r.model} is not one")
    device = resolve_device(r.device)
    streamer = Streamer(r.model, device, resolve_dtype(r.dtype, device), r.trust_remote_code)
    try:
        yield streamer
    finally:
        streamer.close()


def local_or_name(value: str | Path) -> str:
    """An existing local path made absolute (so a saved recipe runs from anywhere); a hub name as is."""
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else str(value)


# ---- checks against the model ------------------------------------------------------------------------
def meta_model(r: Recipe):
    """An empty copy of the recipe's model (no weights: "meta" tensors) to check the recipe against, or
    None when one cannot be built from the config alone (the real load then reports the problem)."""
    from moepress.preflight import meta_model as empty_model

    return empty_model(r.model, r.trust_remote_code, r.allow_pickle)


def preflight(r: Recipe, *, need_stats: bool = False):
    """Everything the inputs decide, before any weight is read: the checkpoint folder and its family,
    the recipe against the model's layers and experts (on an empty copy), then the calibration tokens
    from the tokenizer alone. Returns (tokenizer, batches) for `make_plan`, so nothing is tokenised twice."""
    from moepress.models.loading import load_tokenizer
    from moepress.preflight import check_text, max_position

    check_text(r.data.path)  # present, UTF-8, not empty: the cheapest check first
    meta = meta_model(r)
    if meta is not None:
        check_against_model(r, meta)
        del meta
    tokenizer = load_tokenizer(r.model)
    return tokenizer, recipe_batches(tokenizer, r, need_stats=need_stats, max_position=max_position(r.model))


def recipe_batches(tokenizer, r: Recipe, *, need_stats: bool = False, max_position: int | None = None) -> dict:
    """The calibration tokens a run uses, by layout: "windows" (packed windows: statistics, and searches
    with `layout: windows`) and "documents" (searches with `layout: documents`). Made from the tokenizer
    alone, so too little or unreadable text fails before the model loads."""
    from moepress.data import load_documents, load_tokens

    d = r.data
    stats = need_stats or any(e.kind == "stats" for e in r.methods)
    # a recipe that mixes statistics and search methods gives every entry the same windows, so the
    # merged plan describes one calibration set
    documents = d.layout == "documents" and all(e.kind == "search" for e in r.methods)
    out = {}
    if stats or not documents:
        out["windows"] = load_tokens(tokenizer, d.path, d.n, d.seq_len, d.seed, max_position=max_position)
    if documents:
        out["documents"] = load_documents(tokenizer, d.path, d.n, d.seq_len, d.seed, max_position=max_position)
    return out


def check_against_model(r: Recipe, model) -> list[list[int]]:
    """The layers of each entry; one-line errors for layers, ratios and budgets the model cannot take."""
    from moepress.io.sizes import predict_size, size_of
    from moepress.methods.base import experts_to_prune
    from moepress.methods.search_registry import search_layer_change
    from moepress.models import get_adapter
    from moepress.plan import CompressionPlan, Prune
    from moepress.preflight import check_experts
    from moepress.recipe import keeps_top_k

    adapter = get_adapter(model)
    entry_layers = r.entry_layers(adapter.moe_layer_ids(model))
    decoder = adapter.layers(model)
    lowest: dict[int, Any] = {}  # the smallest each layer can become, for the budget check
    for entry, ids in zip(r.methods, entry_layers, strict=True):
        check_experts(entry.method, entry.experts, [adapter.block(i, decoder[i]) for i in ids])
        for i in ids:
            block = adapter.block(i, decoder[i])
            if entry.kind == "stats":
                if entry.hyperparameters.get("allocation") == "global":
                    continue  # one budget over all layers: the method checks it
                gone = experts_to_prune(block.num_experts, block.top_k, entry.ratio)
                lowest[i] = Prune(keep_experts=list(range(block.num_experts - gone)))
            else:
                k = entry.experts if entry.experts is not None else keeps_top_k(entry.method) * block.top_k
                lowest[i] = search_layer_change(entry.method, min(k, block.num_experts))
    budgets = [e.memory_budget for e in r.methods if e.memory_budget is not None]
    if budgets:
        original = size_of(model).bytes
        best = predict_size(model, CompressionPlan(method="check", layers=lowest)).bytes / original
        if best > min(budgets):
            raise MoepressError(
                f"memory budget {min(budgets)} is out of reach: changing every layer the recipe allows keeps "
                f"{best:.3f} of the model's bytes; raise the budget, keep fewer experts or allow more layers"
            )
    return entry_layers


# ---- planning ----------------------------------------------------------------------------------------
def make_plan(model, tokenizer, r: Recipe, *, need_stats: bool = False, batches: dict | None = None,
              stream=None) -> PlanResult:
    """`_make_plan` with an in-memory model (loaded on the host) on the recipe's device while it plans, and
    back on the host after: calibration moves layers one at a time, but the searches and the embeddings
    the runs start from need the model where the tokens are."""
    if stream is not None:
        return _make_plan(model, tokenizer, r, need_stats=need_stats, batches=batches, stream=stream)
    import torch

    from moepress.models.loading import resolve_device

    device = resolve_device(r.device)
    home = next(model.parameters()).device
    if device == home:
        return _make_plan(model, tokenizer, r, need_stats=need_stats, batches=batches)
    try:
        model.to(device)
    except torch.OutOfMemoryError:
        model.to(home)
        raise MoepressError(f"the model does not fit on {device} to plan; pass --stream to read it one layer at a "
                            "time, or --device cpu") from None
    try:
        return _make_plan(model, tokenizer, r, need_stats=need_stats, batches=batches)
    finally:
        model.to(home)


def _make_plan(model, tokenizer, r: Recipe, *, need_stats: bool = False, batches: dict | None = None,
               stream=None) -> PlanResult:
    """Calibrate (cached) when a statistics method needs it or `need_stats`, run every entry on the
    original model and the same calibration tokens, and merge the decisions into one plan.

    `batches`: the calibration tokens `preflight` already made (else tokenised here). `stream`: a
    `Streamer` whose meta-device model is `model`; calibration and searches read its layers one at a time."""
    from inspect import signature

    from moepress.calibrate.stats import CalibrationStats
    from moepress.io.sizes import predict_size, size_of
    from moepress.methods.base import ModelInputs, get_method, method_is_sequential, method_layer_inputs
    from moepress.methods.search_registry import get_search_method
    from moepress.models import get_adapter
    from moepress.models.loading import resolve_device
    from moepress.pipeline import cached_calibration, max_positions

    entry_layers = check_against_model(r, model)
    adapter = get_adapter(model)
    moe_ids = adapter.moe_layer_ids(model)
    device = resolve_device(r.device)
    d = r.data
    result = PlanResult(plan=None)
    stats_entries = [k for k, e in enumerate(r.methods) if e.kind == "stats"]
    search_entries = [k for k, e in enumerate(r.methods) if e.kind == "search"]
    t = time.perf_counter()
    if batches is None:
        batches = recipe_batches(tokenizer, r, need_stats=need_stats, max_position=max_positions(model))
    moe_inputs: dict = {}
    if stats_entries or need_stats:
        inputs = max((method_layer_inputs(r.methods[k].method) for k in stats_entries), default=0)
        if inputs and stream is not None:
            names = ", ".join(r.methods[k].method for k in stats_entries if method_layer_inputs(r.methods[k].method))
            raise MoepressError(f"{names} reconstructs layer outputs from the layers' weights: run it without --stream")
        stats, moe_inputs, batch = cached_calibration(
            model, tokenizer, d.path, d.n, d.seq_len, d.seed, r.batch_size, device, keep_moe_inputs=inputs,
            batch=batches["windows"], stream=stream,
        )
        stats.meta.update(model=r.model, data=d.path)
        result.stats = stats
    # the searches' tokens: documents, or the statistics' windows (`recipe_batches`)
    batch = batches.get("documents", batches.get("windows"))
    result.seconds["calibration"] = time.perf_counter() - t

    plans: dict[int, Any] = {}
    t = time.perf_counter()
    for k in stats_entries:  # first: their savings count towards the searches' memory budgets
        e, ids = r.methods[k], entry_layers[k]
        whole = set(ids) == set(moe_ids)
        stats = result.stats if whole else CalibrationStats(
            layers={i: result.stats.layers[i] for i in ids}, meta=result.stats.meta
        )
        blocks = None
        if method_layer_inputs(e.method):
            blocks = {i: b for i, b in adapter.blocks(model).items() if i in ids}
        if method_is_sequential(e.method) and stream is not None:
            raise MoepressError(f"{e.method} re-runs the whole model layer by layer: run it without --stream")
        if method_is_sequential(e.method):  # re-runs the model on the statistics' own tokens
            extra = {"model_inputs": ModelInputs(model, batches["windows"].input_ids, r.batch_size, device)}
        else:
            extra = {}
        plans[k] = get_method(e.method)(
            stats, e.ratio, seed=d.seed, blocks=blocks, moe_inputs=moe_inputs or None, **extra, **e.hyperparameters
        )
    original = size_of(model).bytes if any(r.methods[k].memory_budget for k in search_entries) else 0
    for k in search_entries:
        e, ids = r.methods[k], entry_layers[k]
        kwargs: dict[str, Any] = {**e.hyperparameters, "batch_size": r.batch_size, "device": device}
        if stream is not None:
            kwargs["stream"] = stream
        if e.experts is not None:
            kwargs["experts"] = e.experts
        if set(ids) != set(moe_ids):
            kwargs["candidate_layers"] = ids
        if e.num_layers is not None:
            kwargs["layers"] = e.num_layers
        else:
            # the budget is the whole output's; the search alone must save what the others do not
            others = merge_plans(r, [(j, p) for j, p in plans.items()]) if plans else None
            saved = original - predict_size(model, others).bytes if others is not None else 0
            budget = e.memory_budget + saved / original
            if budget >= 1:
                raise MoepressError(
                    f"memory budget {e.memory_budget} is already met by the other methods (they keep "
                    f"{1 - saved / original:.3f} of the bytes); lower the budget or remove {e.method}"
                )
            kwargs["memory_budget"] = budget
        if batch.documents is not None and "documents" in signature(get_search_method(e.method)).parameters:
            kwargs["documents"] = batch.documents  # whole documents: CD-MoE's fixed weights (`data.documents`)
        plan = get_search_method(e.method)(model, batch.input_ids, **kwargs)
        result.volatile[str(k)] = {key: plan.metadata.pop(key) for key in VOLATILE_METADATA
                                   if key in plan.metadata}
        plans[k] = plan
    result.seconds["plan"] = time.perf_counter() - t
    result.plan = merge_plans(r, sorted(plans.items()))
    return result


def merge_plans(r: Recipe, plans: list[tuple[int, Any]]):
    """One plan from the entries' plans (`(entry index, plan)`); a single plan is returned unchanged."""
    from moepress.plan import CompressionPlan

    if len(plans) == 1:
        return plans[0][1]
    layers: dict[int, Any] = {}
    for _, p in plans:
        overlap = set(layers) & set(p.layers)
        if overlap:  # entries have disjoint layers, so this is a bug
            raise AssertionError(f"two entries changed layers {sorted(overlap)}")
        layers.update(p.layers)
    fingerprints = {p.model_fingerprint for _, p in plans}
    data = {p.data_fingerprint for _, p in plans}
    if len(fingerprints) > 1 or len(data) > 1:
        raise AssertionError(f"entries saw different models or data: {fingerprints} {data}")

    def describe(k: int, p) -> dict:
        e = r.methods[k]
        return {"method": p.method, "layers": format_layers(e.layers), "changed": sorted(p.layers)}

    merged = CompressionPlan(
        method="+".join(p.method for _, p in plans),
        hyperparameters={"entries": [{**describe(k, p), **p.hyperparameters} for k, p in plans]},
        model_fingerprint=fingerprints.pop(),
        data_fingerprint=data.pop(),
        layers=dict(sorted(layers.items())),
        metadata={"entries": [{**describe(k, p), **p.metadata} for k, p in plans]},
    )
    for _, p in plans:
        merged.tensors.update(p.tensors)
    return merged


# ---- the whole run -----------------------------------------------------------------------------------
def run_recipe(r: Recipe, overwrite: bool = False, stream: bool = False) -> Path:
    """Run a checked recipe into `r.output` (see the module docstring for what the folder holds).

    `stream`: calibration and searches read one decoder layer at a time from the checkpoint's shards
    onto the device (`calibrate.streaming`, `methods.streamed_search`), and the output is written layer
    by layer (`io.stream_save`): neither the GPU nor the host ever holds the whole model."""
    from moepress.atomic import atomic_dir, check_output
    from moepress.models.loading import load_model
    from moepress.surgery import apply_plan

    out = check_output(r.output, overwrite, inputs=(r.model, r.data.path))
    tokenizer, batches = preflight(r, need_stats=True)
    if stream:
        return _run_recipe_streamed(r, out, overwrite, tokenizer, batches)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, _ = load_model(r.model, dtype=r.dtype, device="cpu", trust_remote_code=r.trust_remote_code,
                          allow_pickle=r.allow_pickle)
    seconds["load"] = time.perf_counter() - t
    result = make_plan(model, tokenizer, r, need_stats=True, batches=batches)
    seconds.update(result.seconds)
    plan = result.plan
    t = time.perf_counter()
    _to_stored_dtype(model, r.model)
    apply_plan(model, plan)
    seconds["apply"] = time.perf_counter() - t
    t = time.perf_counter()
    source = r.model if Path(r.model).is_dir() else None
    with atomic_dir(out, overwrite) as tmp:
        write_checkpoint(model, plan, tmp, source, quantize=r.quantize,
                         calibration=batches["windows"].input_ids if "windows" in batches else None)
        _write_run_files(tmp, r, result, seconds, t)
    write_report_if_available(out)
    return out


def _write_run_files(tmp: Path, r: Recipe, result: PlanResult, seconds: dict[str, float], write_start: float,
                     **extra: Any) -> None:
    """Statistics, resolved recipe and run record next to the written checkpoint."""
    from moepress.io.manifest import moepress_version

    result.stats.save(tmp / STATS_DIR)
    r.save(tmp / RECIPE_FILE)
    seconds["write"] = time.perf_counter() - write_start
    run = {
        "moepress_version": moepress_version(),
        "device": r.device,
        **extra,
        "plan_summary": result.plan.summary(),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "entries": result.volatile,
    }
    (tmp / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")


def _run_recipe_streamed(r: Recipe, out: Path, overwrite: bool, tokenizer, batches: dict) -> Path:
    """`run_recipe` with one decoder layer in memory at a time: streamed calibration and search, then
    the streamed writer (which reads the shards again, one layer at a time)."""
    import torch

    from moepress.atomic import atomic_dir
    from moepress.io.stream_save import save_compressed_streaming
    from moepress.models.loading import stored_dtype

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with streamed_model(r) as streamer:
        seconds["load"] = time.perf_counter() - t
        result = make_plan(streamer.model, tokenizer, r, need_stats=True, batches=batches, stream=streamer)
    seconds.update(result.seconds)
    t = time.perf_counter()
    with atomic_dir(out, overwrite) as tmp:
        inner = save_compressed_streaming(r.model, result.plan, tmp / "checkpoint",
                                          dtype=stored_dtype(r.model) or torch.bfloat16,
                                          trust_remote_code=r.trust_remote_code)
        for f in sorted(inner.iterdir()):
            f.rename(tmp / f.name)
        inner.rmdir()
        if r.quantize is not None:  # shard by shard too; each weight read back, as no model is in memory
            from moepress.io.quantized import quantize_output

            quantize_output(None, tmp, Path(r.model), r.quantize, plain=False, trust_remote_code=False, verify=True,
                            calibration=batches["windows"].input_ids if "windows" in batches else None)
        _write_run_files(tmp, r, result, seconds, t, stream=True)
    write_report_if_available(out)
    return out


def _to_stored_dtype(model, model_path: str | Path) -> None:
    """Write in the dtype the source is stored in (planning may have run in float32)."""
    from moepress.models.loading import stored_dtype

    dtype = stored_dtype(model_path) if Path(model_path).is_dir() else None
    if dtype is None or next(model.parameters()).dtype == dtype:
        return
    # parameters only: `model.to(dtype)` would also round the float32 rotary frequencies (buffers),
    # which loading in that dtype keeps exact, and the written model would no longer match a reload
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def write_checkpoint(model, plan, folder: Path, source: str | Path | None, quantize: str | None = None,
                     calibration=None) -> None:
    """`save_compressed` into `folder` (an existing, empty staging folder) so that more files can join
    the checkpoint before the whole folder is renamed into place."""
    from moepress.io.save import save_compressed

    inner = save_compressed(model, plan, folder / "checkpoint", source=source, quantize=quantize,
                            calibration=calibration)
    for f in sorted(inner.iterdir()):
        f.rename(folder / f.name)
    inner.rmdir()


def apply(model_path: str | Path, plan: str | Path, out: str | Path, *, overwrite: bool = False,
          dtype: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
          stream: bool = False, quantize: str | None = None) -> Path:
    """Apply a saved plan (a plan file, or an output folder holding one) to `model_path`; write `out`.

    `stream`: read, compress and write one decoder layer at a time (models larger than memory).
    `quantize`: write the output as compressed-tensors `fp8`, `w4a16`, ... (data-free schemes only)."""
    from moepress.atomic import check_output
    from moepress.io.save import PLAN_FILE, save_compressed
    from moepress.models.loading import load_model
    from moepress.plan import CompressionPlan
    from moepress.preflight import check_plan
    from moepress.preflight import meta_model as empty_model
    from moepress.surgery import apply_plan

    plan_path = Path(plan) / PLAN_FILE if Path(plan).is_dir() else Path(plan)
    out = check_output(out, overwrite, inputs=(model_path, plan_path))
    if quantize is not None:
        from moepress.quant.export import CALIBRATED, check_quantize

        check_quantize(quantize, model_path)
        if quantize in CALIBRATED:
            raise MoepressError(f"--quantize {quantize} calibrates on text: use it with moepress compress --data")
    # the plan against the model's layers and experts, on an empty copy: before any weight is read
    meta = empty_model(model_path, trust_remote_code, allow_pickle)
    loaded = CompressionPlan.load(plan_path)
    if meta is not None:
        check_plan(loaded, meta)
        del meta
    if stream:
        import torch

        from moepress.io.stream_save import save_compressed_streaming
        from moepress.models.loading import stored_dtype

        if not Path(model_path).is_dir():
            raise MoepressError(f"--stream reads a local checkpoint folder; {model_path} is not one")
        if quantize is None:
            return save_compressed_streaming(model_path, loaded, out,
                                             dtype=stored_dtype(model_path) or torch.bfloat16,
                                             overwrite=overwrite, trust_remote_code=trust_remote_code)
        from moepress.atomic import atomic_dir
        from moepress.io.quantized import quantize_output

        with atomic_dir(out, overwrite) as tmp:  # streamed, then quantised shard by shard, then renamed
            inner = save_compressed_streaming(model_path, loaded, tmp / "checkpoint",
                                              dtype=stored_dtype(model_path) or torch.bfloat16,
                                              trust_remote_code=trust_remote_code)
            for f in sorted(inner.iterdir()):
                f.rename(tmp / f.name)
            inner.rmdir()
            quantize_output(None, tmp, Path(model_path), quantize, plain=False, trust_remote_code=False, verify=True)
        return out
    model, _ = load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle)
    _to_stored_dtype(model, model_path)
    apply_plan(model, loaded)
    source = model_path if Path(model_path).is_dir() else None
    return save_compressed(model, loaded, out, source=source, overwrite=overwrite, quantize=quantize)


def write_plan(plan, path: str | Path, overwrite: bool = False) -> Path:
    """Save `plan` (JSON + novice sidecar) as `path`, both files or neither, refusing to overwrite."""
    import os

    from moepress.atomic import check_output_file, remove_stale_siblings, sibling
    from moepress.plan import sidecar_path

    path = check_output_file(path, overwrite, what="plan file", example="plan.json")
    remove_stale_siblings(path)  # left by a writer that was killed
    tmp = sibling(path, "tmp")
    tmp.mkdir()
    try:
        plan.save(tmp / path.name)
        side = sidecar_path(path)
        if (tmp / side.name).exists():
            os.replace(tmp / side.name, side)
        elif side.exists():
            side.unlink()  # a stale sidecar of an earlier plan would lend it novices
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_report_if_available(out: Path) -> Path | None:
    """The HTML report of an output folder, once `moepress.report` is installed."""
    try:
        from moepress.report import write_report
    except ImportError:
        return None
    return write_report(out)


def copy_stats(src: Path, dst: Path) -> None:
    """Carry an output's calibration statistics into a derived output (e.g. after fine-tuning)."""
    if (src / STATS_DIR).is_dir():
        shutil.copytree(src / STATS_DIR, dst / STATS_DIR)
