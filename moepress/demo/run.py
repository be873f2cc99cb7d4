"""`moepress demo`: every method of the package on one model, end to end, offline, in a few minutes on
CPU — calibrate once, compress with MoNE, frequency pruning, CD-MoE-S, CD-MoE-SR and layer drop at
comparable sizes, write each result as a reloadable checkpoint, evaluate it on held-out text, and
print one table.

Without `--model` the model is the demo model (`moepress.demo.train`: a small DeepSeek-V2-shaped MoE
trained on the demo grammar's five-topic text, cached after the first run), calibrated on its
training text and evaluated on held-out text of another seed. With `--model PATH` any local
checkpoint is used, with `--data` (calibration text) and `--eval-data` (held-out text).

Comparable budgets. `budget` is the number N of MoE layers the layer methods change: CD-MoE-S and
CD-MoE-SR condense N layers (chosen by their greedy JS search), layer drop removes N MoE MLPs. The
pruning methods then get the ratio k/E (k experts of E pruned in every MoE layer) whose predicted
checkpoint bytes (`io.sizes.predict_size`) come closest to CD-MoE-S's: a condensed layer loses all
E routed experts, so k ≈ N·E / (MoE layers). CD-MoE-SR keeps 2 routed experts per condensed layer
and so is slightly larger; layer drop also loses the shared experts and is slightly smaller. The
table shows the bytes of each, so the comparison is read at the sizes actually reached. The default
N is a third of the MoE layers, rounded, at least 1 (`default_budget`: 1 of the demo model's 4, 2 of
a 7-MoE-layer model).

Statistics (MoNE, frequency) come from all calibration sequences; the searches score their
candidates on the first `Sizes.search_sequences` of them — all of them for the demo model, 8 of 32
with `--model`, whose vocabulary makes every candidate's scoring (LM head and JS over the whole
vocabulary) the search's main cost. Held-out text is only ever evaluated on, never calibrated on.

The output folder `OUT/` (default `./moepress-demo`) belongs to the demo: it holds one checkpoint per
method (`OUT/<method>/`, with `moepress_eval.json` and the calibration statistics in
`moepress_stats/` for the report) and `moepress_demo.json` (the table). Running the demo again
replaces a folder the demo wrote, atomically (so `moepress demo` twice in a row just works); any
other existing folder is refused unless `overwrite`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from moepress.atomic import atomic_dir, check_output
from moepress.errors import MoepressError

SUMMARY_FILE = "moepress_demo.json"
EVAL_FILE = "moepress_eval.json"
STATS_DIR = "moepress_stats"
PRUNING = ("mone", "frequency")
SEARCH = ("cd-moe-s", "cd-moe-sr", "layer-drop")
METHODS = (*PRUNING, *SEARCH)
SR_EXPERTS = 2
# CD-MoE-SR's expert search considers the 16 experts with the largest routing weight in each layer:
# every expert of the demo model, and a bounded search on real models with 64 or more.
SR_EXPERT_POOL = 16


@dataclass(frozen=True)
class Sizes:
    """How much text each stage reads: calibration sequences × length (statistics), the first
    `search_sequences` of them (the searches, which score every candidate with the LM head over the
    whole vocabulary, so their cost grows with tokens × vocabulary), held-out tokens."""

    calib_sequences: int
    seq_len: int
    eval_tokens: int
    search_sequences: int


DEMO_SIZES = Sizes(calib_sequences=64, seq_len=128, eval_tokens=16_384, search_sequences=64)
QUICK_SIZES = Sizes(calib_sequences=8, seq_len=64, eval_tokens=2_048, search_sequences=8)
# --model: real vocabularies are large (8k-150k), so the searches score 8 of the 32 sequences
MODEL_SIZES = Sizes(calib_sequences=32, seq_len=256, eval_tokens=8_192, search_sequences=8)


def default_budget(moe_layers: int) -> int:
    """A third of the MoE layers, rounded, at least one: a visible cut that still leaves most layers."""
    return max(1, round(moe_layers / 3))


def check_demo_output(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """The demo replaces a folder it wrote before; anything else existing needs `overwrite`."""
    out = Path(out).expanduser()
    ours = (out / SUMMARY_FILE).is_file()
    if out.exists() and not (ours or overwrite):
        raise MoepressError(
            f"{out} exists and was not written by `moepress demo`; pass --overwrite to replace it "
            "or choose another folder with -o"
        )
    return check_output(out, overwrite=True, inputs=inputs)


def run_demo(
    model: Path | str | None = None,
    out: Path | str = Path("moepress-demo"),
    *,
    budget: int | None = None,
    data: Path | str | None = None,
    eval_data: Path | str | None = None,
    overwrite: bool = False,
    quick: bool = False,
    calib_sequences: int | None = None,
    seq_len: int | None = None,
    eval_tokens: int | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> list[dict]:
    """Run the demo (see the module docstring); returns the table's rows, the original's first.

    Each row: method, setting, bytes, bytes_pct (of the original), ppl (held-out), js and top1
    (divergence from and top-1 agreement with the original on the held-out tokens), path, report.
    `quick` trains a smaller demo model for a few steps and reads little text (for tests).
    `moepress_demo.json` in `out` records the rows and whether this run trained the demo model.
    """
    from moepress.demo.train import QUICK, TrainSettings, ensure_demo_model, single_thread

    console = console or Console()
    out = Path(out)
    if model is None:
        sizes = QUICK_SIZES if quick else DEMO_SIZES
    else:
        sizes = QUICK_SIZES if quick else MODEL_SIZES
        if data is None or eval_data is None:
            raise MoepressError(
                "with --model, give calibration text with --data and held-out text with --eval-data "
                "(e.g. --data calib.txt --eval-data dev.txt)"
            )
    calib = calib_sequences or sizes.calib_sequences
    sizes = Sizes(calib, seq_len or sizes.seq_len, eval_tokens or sizes.eval_tokens,
                  min(calib, sizes.search_sequences))
    if data is not None and eval_data is not None:
        _check_heldout(data, eval_data)
    check_demo_output(out, overwrite, inputs=(Path(model),) if model is not None else ())

    trained = False
    with _quiet_transformers(), single_thread() if model is None else nullcontext():
        if model is None:
            settings = QUICK if quick else TrainSettings()
            console.print(f"[bold]demo model[/bold]: DeepSeek-V2-shaped MoE on the demo grammar's text "
                          f"({settings.num_layers} layers, {settings.experts} experts top-{settings.top_k})",
                          soft_wrap=True)
            demo = ensure_demo_model(settings, log=_training_log(console, settings.steps))
            trained = demo.trained
            said = "trained and cached in" if trained else "using the cached model in"
            console.print(f"{said} {demo.path}", soft_wrap=True)
            model, data, eval_data = demo.path, data or demo.train_text, eval_data or demo.heldout_text
        _check_heldout(data, eval_data)
        return _compress_all(Path(model), out, budget, str(data), str(eval_data), sizes, seed, trained,
                             console)


def _check_heldout(data: Path | str, eval_data: Path | str) -> None:
    """The quality columns are on held-out text: refuse evaluating on the calibration file itself."""
    a, b = Path(data).expanduser(), Path(eval_data).expanduser()
    if str(data) == str(eval_data) or (a.is_file() and b.is_file() and a.samefile(b)):
        raise MoepressError(
            f"--eval-data {eval_data} is the calibration text (--data); give held-out text the model was "
            "not calibrated on (e.g. --data calib.txt --eval-data dev.txt)"
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars over the demo's many small loads and saves (its lines say what runs)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _training_log(console: Console, steps: int):
    def log(step: int, loss: float, aux: float) -> None:
        if step == 0:
            console.print(f"training for {steps} steps (once: later runs reuse the cached model)")
        if step % 100 == 0 or step == steps - 1:
            console.print(f"  step {step + 1}/{steps}: loss {loss:.3f}, load balance {aux:.3f} (1 = even)")

    return log


def _compress_all(model_path: Path, out: Path, budget: int | None, data: str, eval_data: str, sizes: Sizes,
                  seed: int, trained: bool, console: Console) -> list[dict]:
    from moepress.evaluate.pair import evaluate_pair
    from moepress.evaluate.perplexity import load_eval_ids
    from moepress.io.save import save_compressed
    from moepress.io.sizes import size_of
    from moepress.models import get_adapter
    from moepress.models.loading import load_model
    from moepress.pipeline import cached_calibration
    from moepress.surgery.apply import apply_plan

    model, tokenizer = load_model(model_path, dtype="float32", device="cpu")
    moe_layers = get_adapter(model).moe_layer_ids(model)
    n = budget if budget is not None else default_budget(len(moe_layers))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(moe_layers):
        raise MoepressError(f"budget is a number of MoE layers, 1 to {len(moe_layers)}; got {budget!r}")

    console.print(f"calibrating on {sizes.calib_sequences}×{sizes.seq_len} tokens of {data}", soft_wrap=True)
    stats, _, batch = cached_calibration(model, tokenizer, data, sizes.calib_sequences, sizes.seq_len, seed,
                                         batch_size=8, device="cpu")
    eval_ids = load_eval_ids(tokenizer, eval_data, max_tokens=sizes.eval_tokens)
    window = min(sizes.seq_len, eval_ids.numel())

    search_ids = batch.input_ids[: sizes.search_sequences]
    plans = _plans(model, stats, search_ids, n, console)
    original_bytes = size_of(model).bytes
    rows: list[dict] = []
    with atomic_dir(out, overwrite=True) as tmp:
        for name, (plan, setting) in plans.items():
            console.print(f"writing and evaluating {name}")
            compressed = apply_plan(copy.deepcopy(model), plan)
            folder = save_compressed(compressed, plan, tmp / name, source=model_path)
            result = evaluate_pair(compressed, model, tokenizer, eval_ids, window=window, batch_size=8)
            (folder / EVAL_FILE).write_text(json.dumps(result, indent=1) + "\n")
            stats.save(folder / STATS_DIR)
            del compressed
            nbytes = json.loads((folder / "moepress_manifest.json").read_text())["bytes_after"]["total"]
            if not rows:
                ppl0 = result["perplexity"]["original"]["ppl"]
                rows.append(_row("original", _describe(model), original_bytes, original_bytes, ppl0, 0.0, 1.0,
                                 model_path, None))
            div = result["divergence"]
            rows.append(_row(name, setting, nbytes, original_bytes, result["perplexity"]["compressed"]["ppl"],
                             div["js"], div["top1_agreement"], out / name, None))
        reports = _write_reports(tmp, plans)
        for r in rows[1:]:
            r["report"] = str(out / reports[r["method"]].relative_to(tmp)) if r["method"] in reports else None
        summary = {"model": str(model_path), "trained": trained, "data": data, "eval_data": eval_data,
                   "budget_layers": n, "moe_layers": len(moe_layers), "sizes": sizes.__dict__, "rows": rows}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str) + "\n")

    _print_table(rows, console)
    best = min(rows[1:], key=lambda r: r["js"])
    where = best["report"] or f"{best['path']} (HTML reports need a moepress with `moepress.report`)"
    console.print(f"closest to the original: [bold]{best['method']}[/bold]; report: {where}", soft_wrap=True)
    console.print(f"all results: {out}/ ({SUMMARY_FILE} holds this table)", soft_wrap=True)
    return rows


def _plans(model, stats, input_ids: torch.Tensor, n: int, console: Console) -> dict:
    """{method: (plan, setting)} at comparable bytes (see the module docstring)."""
    from moepress.io.sizes import predict_size
    from moepress.methods.base import get_method
    from moepress.methods.search_registry import get_search_method

    plans = {}
    m = len(stats.layers)
    for name in SEARCH:
        console.print(f"searching {name}: {n} of {m} MoE layers, scored on {input_ids.shape[0]}×{input_ids.shape[1]} "
                      "calibration tokens")
        extra = {"experts": SR_EXPERTS, "expert_pool": SR_EXPERT_POOL} if name == "cd-moe-sr" else {}
        plan = get_search_method(name)(model, input_ids, layers=n, batch_size=8, device="cpu", **extra)
        where = ",".join(str(i) for i in sorted(plan.layers))
        layers = f"layer{'s' * (n > 1)} {where}"
        what = {"cd-moe-s": f"condense {layers} → shared", "cd-moe-sr": f"condense {layers} → shared+{SR_EXPERTS}",
                "layer-drop": f"drop {layers}"}[name]
        plans[name] = (plan, what)
    target = predict_size(model, plans["cd-moe-s"][0]).bytes
    first = stats[min(stats.layers)]
    e, top_k = first.num_experts, first.top_k
    mone = get_method("mone")
    k = min(range(1, e - top_k + 1),
            key=lambda k: abs(predict_size(model, mone(stats, k / e)).bytes - target))
    plans = {
        "mone": (mone(stats, k / e), f"{k}/{e} experts → novices"),
        "frequency": (get_method("frequency")(stats, k / e), f"prune {k}/{e} experts"),
        **plans,
    }
    return plans


def _describe(model) -> str:
    from moepress.models import get_adapter

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    b = next(iter(blocks.values()))
    return f"{len(blocks)} MoE × {b.num_experts} experts, top-{b.top_k}"


def _row(method, setting, nbytes, original, ppl, js, top1, path, report) -> dict:
    return {"method": method, "setting": setting, "bytes": int(nbytes),
            "bytes_pct": 100.0 * nbytes / original, "ppl": float(ppl), "js": float(js), "top1": float(top1),
            "path": str(path), "report": report}


def _write_reports(folder: Path, plans: dict) -> dict[str, Path]:
    """One HTML report per method when this moepress has the report writer (else none)."""
    try:
        from moepress.report import write_report
    except ImportError:
        return {}
    return {name: write_report(folder / name) for name in plans}


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _print_table(rows: list[dict], console: Console) -> None:
    # borderless, one space between columns: fits an 80-column terminal (and CI logs) for the demo model
    table = Table(title="moepress demo: comparable sizes, quality on held-out text",
                  caption="size: % of the original's bytes; ppl: held-out perplexity; JS: Jensen-Shannon "
                  "divergence to the original (nats/token); top-1: next-token agreement with the original",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    table.add_column("method", no_wrap=True)
    table.add_column("setting")
    for name in ("bytes", "size", "ppl", "JS", "top-1"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["method"], r["setting"], _size(r["bytes"]), f"{r['bytes_pct']:.1f}%",
                      f"{r['ppl']:.2f}", f"{r['js']:.2e}" if r["js"] else "0", f"{100 * r['top1']:.1f}%")
    console.print(table)
