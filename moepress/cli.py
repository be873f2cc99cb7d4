"""The `moepress` command line: thin wrappers over the Python API, one-line errors, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moepress.errors import MoepressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ModelArg = Annotated[str, typer.Argument(help="Hugging Face checkpoint folder (or hub id when online)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the checkpoint's own code")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="allow the original's .bin weights (weights_only)")]
QuantizeOpt = Annotated[str | None, typer.Option(
    help="write the output as compressed-tensors: fp8 (FP8-dynamic), w4a16 (int4, groups of 128); "
    "gptq-w4a16 (awq-w4a16 on a GPU) calibrate with llm-compressor, pip install 'moepress[gptq]' "
    "(compress only)")]


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


@app.command()
def inspect(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Family, layers, MoE layers, experts, shared experts, routing, parameters and bytes by component."""
    from moepress.inspect import summarize
    from moepress.models.loading import load_model
    from moepress.preflight import meta_model

    meta_model(model, trust_remote_code, allow_pickle)  # an unsupported family fails here, before any weight
    m, _ = load_model(model, dtype="auto", device="cpu", trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle)
    s = summarize(m)
    if json_out:
        print(json.dumps(s.to_dict(), indent=1))
        return
    console.print(f"[bold]{model}[/bold]: family [cyan]{s.family}[/cyan], {s.num_layers} layers, "
                  f"MoE layers {s.moe_layers}")
    console.print(f"supports: {', '.join(s.supports)}")
    console.print(f"routed experts {s.routed_experts} (intermediate {s.expert_intermediate}), top-{s.top_k}, "
                  f"{s.scoring} scoring, renormalise top-k: {s.norm_topk}, scaling {s.routed_scaling}, "
                  f"group-limited: {s.group_limited}; shared-expert rows {s.shared_intermediate}")
    table = Table("component", "parameters", "bytes")
    for c, n in s.parameters.items():
        table.add_row(c, f"{n:,}", _gib(s.bytes[c]))
    console.print(table)
    from moepress.quant import folder_scheme
    from moepress.quant.requantize import stored_bytes

    scheme = folder_scheme(model)
    if scheme is not None:  # the table counts the weights as loaded (dequantised)
        console.print(f"stored in {scheme.name}: {_gib(stored_bytes(Path(model)))} of weight files "
                      "(the table counts the weights dequantised)")


@app.command()
def families(
    markdown: Annotated[bool, typer.Option("--markdown", help="print docs/families.md's Markdown table")] = False,
) -> None:
    """Every MoE family moepress has an adapter for, where its MoE pieces live and how it routes."""
    from moepress.models.families import (
        NEEDS_NEWER_TRANSFORMERS,
        NO_ADAPTER_YET,
        families_markdown,
        families_table,
        needs_newer_transformers,
    )

    if markdown:
        print(families_markdown())
        return
    rows = families_table()
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for model_type, reason in sorted(NO_ADAPTER_YET.items()):
        console.print(f"no adapter yet: [yellow]{model_type}[/yellow]: {reason}")
    for model_type in sorted(NEEDS_NEWER_TRANSFORMERS):
        console.print(f"not with this transformers: {needs_newer_transformers(model_type)}", highlight=False)


@app.command()
def calibrate(
    model: ModelArg,
    data: Annotated[str, typer.Option(help=".txt/.jsonl/.parquet file or HF dataset name")],
    out: Annotated[Path, typer.Option("-o", "--out", help="statistics folder to write")],
    n: Annotated[int, typer.Option("-n", help="number of calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    seed: int = 0,
    batch_size: int = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: bool = False,
    trust_remote_code: RemoteOpt = False,
    stream: Annotated[bool, typer.Option(help="read one layer at a time from the shards")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from OUT.partial/")] = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Collect per-expert statistics layer by layer; writes stats.safetensors + stats.json.

    Several GPUs: `torchrun --nproc-per-node G -m moepress calibrate ...` splits the sequences.
    """
    from moepress.pipeline import run_calibration

    result = run_calibration(
        model, data, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
        out=out, overwrite=overwrite, trust_remote_code=trust_remote_code, stream=stream, resume=resume,
        allow_pickle=allow_pickle,
    )
    from moepress.calibrate.distributed import world

    if world()[0] != 0:
        return
    s = result.stats
    console.print(f"calibrated {len(s.layers)} MoE layers on {s.meta['num_sequences']}×{s.meta['seq_len']} "
                  f"tokens (data {s.meta.get('data_fingerprint')}) → {out}")
    table = Table("layer", "dead experts", "min freq", "max freq", "mean var")
    for i, ls in sorted(s.layers.items()):
        table.add_row(str(i), str(int((ls.count == 0).sum())), f"{ls.frequency.min():.4f}",
                      f"{ls.frequency.max():.4f}", f"{ls.output_variance.mean():.3e}")
    console.print(table)


# ---- compression: plan, apply, compress, diff ------------------------------------------------------
METHODS_HELP = ("mone, frequency, reap, naee, random, variance, frequency+novice, cd-moe (= cd-moe-sr), "
                "cd-moe-s, layer-drop")
MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help=METHODS_HELP)]
RatioOpt = Annotated[float | None, typer.Option(help="share of routed experts to prune, in (0, 1)")]
LayersOpt = Annotated[int | None, typer.Option("--layers", help="search methods: MoE layers to change")]
ExpertsOpt = Annotated[int | None, typer.Option(help="cd-moe-sr: routed experts kept per condensed layer")]
BudgetOpt = Annotated[float | None, typer.Option(help="search methods: share of the original bytes to keep")]
HpOpt = Annotated[list[str] | None, typer.Option("--hp", help="method hyperparameter KEY=VALUE (repeatable)")]
NOpt = Annotated[int | None, typer.Option(
    "-n", help="calibration sequences [128]; search methods (cd-moe*, layer-drop): 100 documents")]
SeqOpt = Annotated[int | None, typer.Option(
    help="tokens per calibration sequence [512]; search methods: 256, each document's first tokens (cd-moe-sr's "
    "fixed weights: each document whole, up to the model's context length)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
StreamOpt = Annotated[bool, typer.Option(
    help="one decoder layer on the device (and in memory) at a time, read from the safetensors shards")]
RemoteHelp = "allow the checkpoint's own code"
PickleHelp = "allow .bin weights (weights_only)"


def _hp(items: list[str] | None) -> dict | None:
    """`--hp fusion_weight=0.3 --hp allocation=global` -> {"fusion_weight": 0.3, "allocation": "global"}."""
    import yaml

    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoepressError(f"--hp takes KEY=VALUE (got {item!r}), e.g. --hp fusion_weight=0.3")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _plan_table(plan) -> Table:
    from moepress.surgery.diff import describe_action

    table = Table("layer", "action")
    for i, a in sorted(plan.layers.items()):
        table.add_row(str(i), describe_action(a))
    return table


def _written(out: Path, json_out: bool) -> None:
    """What `compress`/`apply`/`finetune` wrote: plan summary, bytes, how the folder loads."""
    from moepress.io.manifest import MANIFEST_FILE, Manifest
    from moepress.io.save import PLAN_FILE
    from moepress.plan import CompressionPlan

    plan = CompressionPlan.load(out / PLAN_FILE)
    m = Manifest.model_validate_json((out / MANIFEST_FILE).read_text())
    before, after = m.bytes_before["total"], m.bytes_after["total"]
    stored = (m.stored_bytes_before, m.stored_bytes_after)  # quantised weights: what the shards hold
    if json_out:
        print(json.dumps({"output": str(out), "method": plan.method, "actions": plan.summary(),
                          "bytes_before": before, "bytes_after": after,
                          "stored_bytes_before": stored[0], "stored_bytes_after": stored[1],
                          "plain_architecture": m.plain_architecture}, indent=1))
        return
    console.print(_plan_table(plan))
    loads = ("plain transformers (AutoModelForCausalLM)" if m.plain_architecture
             else "moepress.load, or transformers with trust_remote_code=True")
    size = f"{_gib(before)} → {_gib(after)} ({100 * after / before:.1f}%)"
    if None not in stored:
        scheme = (m.quantization or {}).get("scheme", "quantised")
        size = (f"{_gib(stored[0])} → {_gib(stored[1])} stored ({100 * stored[1] / stored[0]:.1f}%, {scheme}; "
                f"{size} unquantised)")
    console.print(f"{plan.method}: {plan.summary()}; {size} → [bold]{out}[/bold], loads with {loads}",
                  soft_wrap=True)


@app.command()
def plan(
    model: ModelArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="plan JSON to write (+ .novices.safetensors)")],
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    layers: LayersOpt = None,
    experts: ExpertsOpt = None,
    memory_budget: BudgetOpt = None,
    stats: Annotated[Path | None, typer.Option(help="statistics folder from `moepress calibrate`")] = None,
    data: Annotated[str | None, typer.Option(help="calibration text (search methods, naee)")] = None,
    n: NOpt = None,
    seq_len: SeqOpt = None,
    seed: Annotated[int | None, typer.Option(help="data selection and random methods [0]")] = None,
    hp: HpOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per forward [8]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16")] = None,
    overwrite: bool = False,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    stream: StreamOpt = False,
) -> None:
    """Decide what to compress, change nothing: statistics (or a search on --data) → plan JSON."""
    from moepress.atomic import check_output_file
    from moepress.compression import plan_for, write_plan

    if method is None:
        raise MoepressError("give --method, e.g. --method mone --ratio 0.25")
    check_output_file(out, overwrite, what="plan file", example="plan.json")  # before any work
    made = plan_for(
        model, method, stats=stats, data=data, ratio=ratio, layers=layers, experts=experts,
        memory_budget=memory_budget, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device,
        dtype=dtype, trust_remote_code=trust_remote_code or None, allow_pickle=allow_pickle or None, hp=_hp(hp),
        stream=stream,
    )
    path = write_plan(made, out, overwrite)
    if json_out:
        print(json.dumps({"plan": str(path), "method": made.method, "actions": made.summary()}, indent=1))
        return
    console.print(_plan_table(made))
    console.print(f"{made.method}: {made.summary()} → [bold]{path}[/bold]")


@app.command()
def apply(
    model: ModelArg,
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="plan JSON, or an output folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder to write")],
    overwrite: bool = False,
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    stream: Annotated[bool, typer.Option(help="one decoder layer in memory at a time (larger than RAM)")] = False,
    quantize: QuantizeOpt = None,
) -> None:
    """Apply a plan to MODEL and write a verified checkpoint folder (never over the input)."""
    from moepress.compression import apply as apply_saved

    written = apply_saved(model, plan_file, out, overwrite=overwrite, dtype=dtype,
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, stream=stream,
                          quantize=quantize)
    _written(written, json_out)


@app.command()
def compress(
    model: Annotated[str | None, typer.Argument(help="checkpoint folder or hub id (or the recipe's)")] = None,
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    layers: LayersOpt = None,
    experts: ExpertsOpt = None,
    memory_budget: BudgetOpt = None,
    data: Annotated[str | None, typer.Option(help="calibration text: .txt/.jsonl/.parquet")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="output folder (beats the recipe)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe; command-line settings win")] = None,
    n: NOpt = None,
    seq_len: SeqOpt = None,
    seed: Annotated[int | None, typer.Option(help="data selection and random methods [0]")] = None,
    hp: HpOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per forward [8]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16")] = None,
    overwrite: bool = False,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code", help=RemoteHelp)] = None,
    allow_pickle: Annotated[bool | None, typer.Option("--allow-pickle", help=PickleHelp)] = None,
    json_out: JsonOpt = False,
    stream: StreamOpt = False,
    quantize: QuantizeOpt = None,
) -> None:
    """Calibrate (cached), plan, apply and write in one go; OUT also gets the statistics, the resolved
    recipe (rerun: `moepress compress --recipe OUT/moepress_recipe.yaml -o OUT2`) and a report."""
    from moepress.compression import compress as run_compress

    written = run_compress(
        model, method, out, data=data, ratio=ratio, layers=layers, experts=experts,
        memory_budget=memory_budget, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device,
        dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        hp=_hp(hp), recipe=recipe, stream=stream, quantize=quantize,
    )
    _written(written, json_out)


def _plan_path(path: Path) -> Path:
    from moepress.io.save import PLAN_FILE

    return path / PLAN_FILE if path.is_dir() else path


@app.command()
def diff(
    plan_a: Annotated[Path, typer.Argument(metavar="PLAN_A", help="plan JSON or output folder")],
    plan_b: Annotated[Path, typer.Argument(metavar="PLAN_B", help="plan JSON or output folder")],
    json_out: JsonOpt = False,
) -> None:
    """What two plans do differently, layer by layer and expert by expert."""
    from moepress.plan import CompressionPlan
    from moepress.surgery.diff import diff_plans

    a, b = CompressionPlan.load(_plan_path(plan_a)), CompressionPlan.load(_plan_path(plan_b))
    lines = diff_plans(a, b)
    if json_out:
        print(json.dumps({"a": a.method, "b": b.method, "differences": lines}, indent=1))
        return
    console.print(f"a = {plan_a} ({a.method}), b = {plan_b} ({b.method})", highlight=False)
    for line in lines:
        console.print(line, highlight=False)
    if not lines:
        console.print("the plans do the same thing")


# ---- evaluation, speed, fine-tuning -------------------------------------------------------------------
def _rows_table(rows: list[dict], title: str):
    from moepress.evaluate.report_table import ComparisonRow, rows_table

    return rows_table([ComparisonRow(**r) for r in rows], title=title)


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="compressed output folder (or any checkpoint)")],
    against: Annotated[str | None, typer.Option(help="the original model, evaluated side by side")] = None,
    ppl: Annotated[str | None, typer.Option(help="perplexity text (.txt/.jsonl/.parquet)")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated, e.g. piqa,hellaswag,arc_easy")] = None,
    task_set: Annotated[str | None, typer.Option(help="a paper's whole task set and its average: cd-moe, mone")] = None,
    task_data: Annotated[Path | None, typer.Option(help="folder of <task>.jsonl files")] = None,
    limit: Annotated[int | None, typer.Option(help="examples per task (quick runs)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="perplexity tokens to read [all]")] = None,
    batch_size: int = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity, divergence to the original and zero-shot tasks: one table, both models side by side;
    also written to OUT/moepress_eval.json."""
    from moepress.evaluate.output import evaluate_output
    from moepress.preflight import check_inputs

    check_inputs(models=(out, against), texts=(ppl,), allow_pickle=allow_pickle)  # before any weight is read
    result, written = evaluate_output(
        out, against, ppl, (tasks or "").split(","), task_data=task_data, task_limit=limit, task_set=task_set,
        max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    )
    if json_out:
        print(json.dumps(result, indent=1, default=str))
        return
    console.print(_rows_table(result["rows"], f"{out} vs {against or '(no original)'}"))
    if result.get("task_set"):
        from moepress.evaluate.task_sets import task_set as task_set_named

        console.print(f"{task_set} average, as the paper takes it: {task_set_named(task_set).metric_summary()}")
    if written:
        console.print(f"wrote {written}")


@app.command()
def bench(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="compressed output folder")],
    against: Annotated[str, typer.Option(help="the original model")],
    batch_sizes: Annotated[str | None, typer.Option(help="comma-separated [CPU 1; GPU 1,32]")] = None,
    prompt_len: Annotated[int | None, typer.Option(help="prompt tokens [CPU 64; GPU 512]")] = None,
    new_tokens: Annotated[int | None, typer.Option(help="decoded tokens [CPU 8; GPU 64]")] = None,
    repeats: Annotated[int | None, typer.Option(help="timed runs, median reported [CPU 2; GPU 3]")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    compile: Annotated[bool, typer.Option(
        "--compile", help="also decode with a static KV cache and torch.compile (reduce-overhead)")] = False,
    bandwidth: Annotated[float | None, typer.Option(
        help="memory bandwidth in bytes/s for the bytes-read limit [4.8e12, H200]")] = None,
) -> None:
    """Parameter bytes, prefill/decode tokens/s and peak memory, compressed against original, in this
    process on one device; also written to OUT/moepress_bench.json. Decode speeds are also given as
    a share of the bytes-read limit (bytes one step reads ÷ --bandwidth)."""
    from moepress.evaluate.output import bench_output
    from moepress.preflight import check_inputs

    check_inputs(models=(out, against), allow_pickle=allow_pickle)  # before any weight is read
    sizes = None
    if batch_sizes:
        try:
            sizes = [int(b) for b in batch_sizes.split(",")]
        except ValueError:
            raise MoepressError(f"--batch-sizes takes integers such as 1,32 (got {batch_sizes!r})") from None
    cmp, rows, written = bench_output(
        out, against, batch_sizes=sizes, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
        device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        compile_mode="reduce-overhead" if compile else None, bandwidth=bandwidth,
    )
    if json_out:
        print(json.dumps({**cmp.to_dict(), "rows": [r.to_dict() for r in rows]}, indent=1, default=str))
        return
    console.print(_rows_table([r.to_dict() for r in rows], f"{out} vs {against} on {cmp.device}"))
    speedups = ", ".join(f"b={b}: {v:.2f}×" for b, v in cmp.decode_speedup.items() if v is not None)
    compiled = ", ".join(f"b={b}: {v:.2f}×" for b, v in cmp.compiled_decode_speedup.items() if v is not None)
    console.print(f"bytes ratio {cmp.bytes_ratio:.3f}; decode speed-up {speedups}"
                  + (f" (compiled {compiled})" if compiled else "")
                  + f"; bytes-read limit {cmp.decode_bytes_limit_speedup:.2f}×")
    if cmp.cpu_timing:
        console.print("[yellow]CPU timings, small sizes: not representative of GPU serving speed[/yellow]")
    if written:
        console.print(f"wrote {written}")


@app.command()
def finetune(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output folder with condensed layers")],
    data: Annotated[str, typer.Option(help="training text (.txt/.jsonl)")],
    dest: Annotated[Path, typer.Option("-o", "--out", help="new output folder to write")],
    tokens: Annotated[str, typer.Option(help="training tokens: 2M, 500k, 2000000")] = "2M",
    eval_data: Annotated[str | None, typer.Option(help="held-out text for perplexity before/after")] = None,
    eval_tokens: Annotated[str, typer.Option(help="held-out tokens to score")] = "64k",
    recipe: Annotated[str, typer.Option(help="reference (CD-MoE's: lr 1e-5, linear decay, fixed weights kept "
                                             "outside the experts) or fast (lr 1e-4, cosine)")] = "reference",
    sft: Annotated[Path | None, typer.Option(help="prompt/answer .jsonl for a second, supervised stage")] = None,
    seq_len: Annotated[int | None, typer.Option(help="training sequence length [recipe's: 256 / 512]")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate [recipe's: 1e-5 / 1e-4]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per step [recipe's: 8]")] = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: bool = False,
    trust_remote_code: RemoteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train only the condensed layers of OUT for a token budget (then on --sft pairs); write a new output folder."""
    from moepress.finetune.output import finetune_output
    from moepress.preflight import check_inputs

    check_inputs(models=(out,), texts=(data, eval_data))  # before any weight is read
    written, result = finetune_output(
        out, data, tokens, dest, eval_data=eval_data, eval_tokens=eval_tokens, recipe=recipe, sft=sft,
        seq_len=seq_len, lr=lr, batch_size=batch_size, seed=seed, gradient_checkpointing=gradient_checkpointing,
        device=device, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code,
    )
    if json_out:
        print(json.dumps({"output": str(written), **result.to_dict()}, indent=1))
        return
    ppl = ""
    if result.ppl_before is not None:
        ppl = f"; held-out perplexity {result.ppl_before:.3f} → {result.ppl_after:.3f}"
    sft_steps = f" + {result.sft_steps} SFT steps" if result.sft_steps else ""
    console.print(f"fine-tuned ({result.recipe} recipe) layers {result.layers} ({result.trainable_parameters:,} "
                  f"parameters) for {result.steps} steps{sft_steps}, {result.tokens:,} tokens, "
                  f"{result.seconds:.1f} s{ppl} "
                  f"→ [bold]{written}[/bold]", soft_wrap=True)


@app.command("demo-model")
def demo_model(
    out: Annotated[Path, typer.Option("-o", "--out", help="folder to write")] = Path("tiny"),
    family: str = "deepseek_v2",
    overwrite: bool = False,
) -> None:
    """Write a tiny random-initialised MoE checkpoint (no download), for trying the tool."""
    from moepress.pipeline import write_demo_model

    write_demo_model(out, family=family, overwrite=overwrite)
    console.print(f"wrote a tiny {family} checkpoint to {out}")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="folder written by `moepress compress` or `moepress apply`")],
    stats: Annotated[Path | None, typer.Option("--stats", help="default OUT/moepress_stats")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="default OUT/report.html")] = None,
) -> None:
    """One self-contained HTML page: expert statistics with the plan, search curve, plan, bytes, quality."""
    from moepress.report import write_report

    path = write_report(out, stats_dir=stats, dest=output)
    console.print(f"wrote {path}")


@app.command()
def demo(
    model: Annotated[Path | None, typer.Option(
        "--model", help="local checkpoint (default: the demo model, trained once and cached)")] = None,
    data: Annotated[str | None, typer.Option("--data", help="calibration text (with --model)")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="held-out text (with --model)")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="folder to write (owned by the demo)")] = Path(
        "moepress-demo"),
    budget: Annotated[int | None, typer.Option(help="MoE layers to condense or drop")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUT even if the demo did not write it")] = False,
    quick: Annotated[bool, typer.Option(help="few training steps, little text (smoke test)")] = False,
) -> None:
    """Every method end to end, offline on CPU: MoNE, frequency pruning, CD-MoE-S/SR and layer drop at
    comparable sizes, each written to OUT/<method>/ and evaluated on held-out text, in one table.

    A second run replaces OUT when the demo wrote it; the trained demo model is cached in
    ~/.cache/moepress/demo (or $MOEPRESS_CACHE/demo).
    """
    from moepress.demo.run import run_demo
    from moepress.preflight import check_inputs

    check_inputs(models=(model,), texts=(data, eval_data))  # before any weight is read
    run_demo(model, out, budget=budget, data=data, eval_data=eval_data, overwrite=overwrite, quick=quick,
             console=console)


def _cli_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) to catch: recent typer releases vendor their own click (`typer._click`),
    whose exceptions are not click's, so a bad option would otherwise end in a traceback."""
    import click

    usage: list[type] = [click.exceptions.ClickException]
    aborts: list[type] = [click.exceptions.Abort]
    if hasattr(typer, "TyperException"):  # base of the vendored click's exceptions
        usage.append(typer.TyperException)
    if isinstance(getattr(typer, "Abort", None), type):
        aborts.append(typer.Abort)
    return tuple(usage), tuple(aborts)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    usage, aborts = _cli_exception_types()
    try:
        # standalone_mode=False: our exceptions reach us; typer then *returns* exit codes, such as 130
        # for a KeyboardInterrupt it caught itself, instead of calling sys.exit
        code = app(standalone_mode=False)
    except MoepressError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except (typer.Exit, SystemExit) as err:
        code = getattr(err, "exit_code", getattr(err, "code", 0))
    except usage as err:  # unknown option, missing argument, ...
        err.show()
        sys.exit(2)
    except aborts:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    if code == 130:
        print("error: interrupted; nothing was written", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
