"""`README.md` of every output folder: a Hugging Face model card.

A YAML head (`base_model`, `library_name: moepress`, `tags`, `pipeline_tag`) and a body that says what
was done (method, hyperparameters, per-layer actions), what it saved (parameters and bytes by component,
from the manifest), which format the folder is in (derived from config.json), how to load and serve it,
and, once `moepress eval` has run on the folder, its evaluation table.

The functions that build text are pure (inputs -> markdown); `write_model_card` reads a finished
folder and writes its card, `update_card_eval` (re)writes only the card's evaluation section.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moepress.errors import MoepressError
from moepress.io.manifest import MANIFEST_FILE, Manifest
from moepress.plan import CompressionPlan

CARD_FILE = "README.md"
PLAN_FILE = "moepress_plan.json"  # = moepress.io.save.PLAN_FILE (not imported: save imports this module)
EVAL_FILE = "moepress_eval.json"  # = moepress.evaluate.output.EVAL_FILE
EVAL_START = "<!-- moepress:eval -->"
EVAL_END = "<!-- /moepress:eval -->"
FOLDER = "MODEL_DIR"  # how the snippets name this folder (its final path is not known while it is written)

PLAIN, MODULES, NATIVE = "plain", "moepress", "approximate_experts"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- what the folder is -------------------------------------------------------------------------------
def output_format(config: Mapping[str, Any]) -> str:
    """`moepress` (moepress's own modules: `moepress_structure`), `approximate_experts` (the source
    architecture plus the novice format vLLM reads natively) or `plain` (the source architecture)."""
    if "moepress_structure" in config:
        return MODULES
    if "approximate_experts" in config:
        return NATIVE
    return PLAIN


def remote_base(config: Mapping[str, Any]) -> bool:
    """Whether the source architecture is code the folder carries (a remote-code source such as
    DeepSeekMoE-16B), not transformers': then every load needs `trust_remote_code=True`. A moepress-modules
    folder always has an `auto_map` (to `modeling_moepress.py`), which `moepress.load` does not need."""
    structure = config.get("moepress_structure")
    if structure is not None:
        return str(structure.get("base", {}).get("module", "")).startswith(".")
    if "approximate_experts" in config:  # its auto_map names the folder's loader for the native format
        return False
    return "auto_map" in config


def base_model_id(source_path: str | None, source_config: Mapping[str, Any] | None = None) -> str | None:
    """The source model's hub id when known: the path itself when it is one, the `models--org--name`
    folder of a Hugging Face cache snapshot, the source config's `_name_or_path` when that is a hub id;
    else a local folder's name. None when there is no source path."""
    if not source_path:
        return None
    path = Path(source_path)
    if not path.exists() and _HUB_ID.match(source_path):
        return source_path
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    named = (source_config or {}).get("_name_or_path")
    if isinstance(named, str) and _HUB_ID.match(named) and not Path(named).exists():
        return named
    return path.name or None


def card_metadata(method: str, base_model: str | None, license: str | None = None) -> dict[str, Any]:
    """The card's YAML head."""
    tags = ["moe", "compressed", "moepress"]
    for m in method.split("+"):  # a combined plan ("mone+frequency") tags each method
        tag = m.strip().lower()
        if tag and tag not in tags:
            tags.append(tag)
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    if license:
        meta["license"] = license
    meta.update({"library_name": "moepress", "tags": tags, "pipeline_tag": "text-generation"})
    return meta


# ---- sections -----------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def _pct(after: float, before: float) -> str:
    return f"{100 * after / before:.1f}%" if before else "–"


def _value(v: Any) -> str:
    return f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`"


def method_section(plan: CompressionPlan) -> str:
    """Method, hyperparameters and what happened to each changed layer."""
    from moepress.surgery.diff import describe_action

    counts = ", ".join(f"{n} {a}" for a, n in sorted(plan.summary().items())) or "no layer changed"
    lines = ["## Compression", "", f"- method: **{plan.method}**", f"- layers: {counts}"]
    hp = plan.hyperparameters
    ratio = hp.get("ratio")
    if ratio is not None:
        lines.append(f"- ratio: {ratio} (share of routed experts pruned)")
    for key in sorted(k for k in hp if k not in ("ratio", "entries")):
        lines.append(f"- {key}: {_value(hp[key])}")
    for entry in hp.get("entries", []):  # a combined plan: each part's own settings
        lines.append(f"- part: {_value(entry)}")
    if plan.data_fingerprint:
        lines.append(f"- calibration data fingerprint: `{plan.data_fingerprint}`")
    if plan.model_fingerprint:
        lines.append(f"- source model fingerprint: `{plan.model_fingerprint}`")
    if plan.layers:
        lines += ["", "<details><summary>Per-layer actions</summary>", "", "| layer | action |", "|---:|---|"]
        lines += [f"| {i} | {describe_action(a)} |" for i, a in sorted(plan.layers.items())]
        lines += ["", "</details>"]
    lines.append(f"\nThe full plan is in `{PLAN_FILE}` (re-apply it with `moepress apply BASE_MODEL {PLAN_FILE}`).")
    return "\n".join(lines)


def size_section(manifest: Manifest) -> str:
    """Parameters and bytes before and after, by component (the manifest's numbers)."""
    comps = [c for c in dict.fromkeys([*manifest.bytes_before, *manifest.bytes_after]) if c != "total"]
    pb, pa, bb, ba = manifest.params_before, manifest.params_after, manifest.bytes_before, manifest.bytes_after
    tb, ta = bb.get("total", 0), ba.get("total", 0)
    lines = [
        "## Size",
        "",
        f"{_size(tb)} → **{_size(ta)}** ({_pct(ta, tb)} of the original bytes; "
        f"{_count(pb.get('total', 0))} → {_count(pa.get('total', 0))} parameters).",
        "",
        "| component | parameters before | parameters after | bytes before | bytes after | bytes kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in [*comps, "total"]:
        name = f"**{c}**" if c == "total" else c
        lines.append(
            f"| {name} | {pb.get(c, 0):,} | {pa.get(c, 0):,} | {bb.get(c, 0):,} | {ba.get(c, 0):,} "
            f"| {_pct(ba.get(c, 0), bb.get(c, 0))} |"
        )
    q = manifest.quantization
    before, after = manifest.stored_bytes_before, manifest.stored_bytes_after
    if q and before and after and q.get("quantize"):  # `--quantize`: a float input, quantised on the way out
        lines += [
            "",
            f"Quantised on the way out ({q['scheme']}, `--quantize {q['quantize']}`): the table counts the weights "
            f"in float; as stored, with their scales, the weight files go from {_size(before)} to **{_size(after)}** "
            f"({_pct(after, before)}). {len(q['quantized'])} linear weights quantised, {len(q['unquantized'])} "
            "(lm_head, routers, shapes the scheme cannot take) left in float.",
        ]
    elif q and before and after:
        lines += [
            "",
            f"The input is quantised ({q['scheme']}) and so is this output: the table counts the weights in "
            f"float; as stored, with their scales, the weight files go from {_size(before)} "
            f"to **{_size(after)}** ({_pct(after, before)}). "
            f"{q['copied']} weights were copied from the input as stored, {len(q['quantized'])} new ones quantised "
            f"in {q['scheme']}, {len(q['unquantized'])} left in float.",
        ]
    return "\n".join(lines)


def usage_section(fmt: str, remote_code: bool, auto_map: bool | None = None) -> str:
    """Which format the folder is in, how to load it and how to serve it. `remote_code`: the source
    architecture is code carried in the folder (loads need `trust_remote_code=True`); `auto_map`:
    config.json maps transformers' auto classes to the folder's code (default: `remote_code`)."""
    auto_map = remote_code if auto_map is None else auto_map
    trust = ", trust_remote_code=True" if remote_code else ""
    trust_flag = " --trust-remote-code" if remote_code else ""
    what = {
        PLAIN: "**plain source architecture**: the source model's own `model_type` and classes with the "
        "changed sizes in config.json; no custom code is needed"
        + (" beyond the source's own remote code, which this folder carries" if remote_code else "")
        + ".",
        NATIVE: "**source architecture with `approximate_experts`**: the novice format vLLM reads natively "
        "(retained experts under their original ids, novices as `<experts>.<id>.approx_value`). "
        "Plain transformers refuses it (the expert count differs from the config's).",
        MODULES: "**moepress modules**: config.json carries `moepress_structure` and its own `model_type`; "
        "`modeling_moepress.py` (with `moepress_modules.py`) rebuilds the changed layers.",
    }[fmt]
    load = ["```python"]
    if fmt == PLAIN:
        load += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{FOLDER}"{trust})',
            f'tokenizer = AutoTokenizer.from_pretrained("{FOLDER}")',
            "",
            "# or, with moepress installed:",
            "import moepress",
            "",
            f'model = moepress.load("{FOLDER}"{trust})',
        ]
    else:
        load += ["import moepress", "", f'model = moepress.load("{FOLDER}"{trust})']
        if auto_map:
            load += [
                "",
                "# or plain transformers, running the folder's own code:",
                "from transformers import AutoModelForCausalLM",
                "",
                f'model = AutoModelForCausalLM.from_pretrained("{FOLDER}", trust_remote_code=True)',
            ]
    load.append("```")
    if fmt == PLAIN:
        serve = ["```bash", f"vllm serve {FOLDER}{trust_flag}", "```"]
    elif fmt == NATIVE:
        serve = [
            "vLLM 0.33 and later serve this format as it is. An older vLLM needs moepress installed next to it "
            "(its vLLM plugin takes the novices over); without it, it stops at the `moepress_novice_guard` "
            "tensor rather than serving the novices' experts uninitialised.",
            "",
            "```bash",
            "pip install moepress  # only for vLLM < 0.33",
            f"vllm serve {FOLDER}",
            "```",
        ]
    else:
        serve = [
            "With moepress installed next to vLLM, vLLM loads this folder through moepress's vLLM plugin "
            "(entry point `vllm.general_plugins`):",
            "",
            "```bash",
            "pip install moepress",
            f"vllm serve {FOLDER}{trust_flag}",
            "```",
        ]
    return "\n".join(
        [
            "## Format",
            "",
            f"Format: `{fmt}`, the {what}",
            "",
            f"## Use (`{FOLDER}`: this folder, or its hub repo id once uploaded)",
            "",
            *load,
            "",
            "## Serve",
            "",
            *serve,
        ]
    )


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "bytes":
        return _size(value)
    if unit == "tokens/s":
        return f"{value:,.1f}"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def eval_section(result: Mapping[str, Any] | None) -> str:
    """The evaluation section (between markers, so that a later `moepress eval` replaces only it): the
    comparison table of a `moepress eval` result, or how to make one."""
    lines = [EVAL_START, "## Evaluation", ""]
    rows = (result or {}).get("rows") or []
    if not rows:
        lines.append(
            f"Not evaluated yet. `moepress eval {FOLDER} --against BASE_MODEL --ppl text.txt --tasks piqa` "
            "writes the table here."
        )
    else:
        inputs = result.get("inputs") or {}
        said = [
            f"{k} `{Path(str(v)).name if k in ('ppl', 'task_data', 'against') else v}`"
            for k in ("against", "ppl", "tasks", "task_set", "task_limit", "max_tokens", "device", "dtype")
            if (v := inputs.get(k)) not in (None, [], "")
        ]
        if said:
            lines += [f"`moepress eval` with {', '.join(said)}:", ""]
        lines += ["| metric | original | compressed | retained |", "|---|---:|---:|---:|"]
        for r in rows:
            kept = r.get("retained_pct")
            unit = r.get("unit", "")
            lines.append(
                f"| {r.get('metric')} | {_fmt(r.get('original'), unit)} | {_fmt(r.get('compressed'), unit)} "
                f"| {'–' if kept is None else f'{kept:.1f}%'} |"
            )
        lines += ["", f"Full results: `{EVAL_FILE}`."]
    lines.append(EVAL_END)
    return "\n".join(lines)


def render_card(
    config: Mapping[str, Any],
    plan: CompressionPlan,
    manifest: Manifest,
    *,
    base_model: str | None = None,
    license: str | None = None,
    eval_result: Mapping[str, Any] | None = None,
) -> str:
    """The whole card as markdown, from the folder's config.json, plan and manifest."""
    meta = card_metadata(plan.method, base_model, license)
    fmt = output_format(config)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    title = f"{base_model or 'model'}, compressed with moepress ({plan.method})"
    intro = (
        f"This checkpoint is [{base_model}](https://huggingface.co/{base_model}) "
        if base_model and _HUB_ID.match(base_model)
        else f"This checkpoint is {base_model or 'a Mixture-of-Experts model'} "
    )
    intro += f"with its experts compressed by moepress {manifest.moepress_version}."
    body = [
        f"# {title}",
        intro,
        method_section(plan),
        size_section(manifest),
        usage_section(fmt, remote_code=remote_base(config), auto_map="auto_map" in config),
        eval_section(eval_result),
    ]
    return f"---\n{head}---\n\n" + "\n\n".join(body) + "\n"


def with_eval(card: str, result: Mapping[str, Any] | None) -> str:
    """`card` with its evaluation section replaced by `result`'s (appended when it has none)."""
    section = eval_section(result)
    start, end = card.find(EVAL_START), card.find(EVAL_END)
    if start != -1 and end > start:
        return card[:start] + section + card[end + len(EVAL_END) :]
    return card.rstrip("\n") + "\n\n" + section + "\n"


# ---- files --------------------------------------------------------------------------------------------
def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _source_license(source: Path | None) -> str | None:
    """The `license` of the source folder's own model card, if it has one."""
    if source is None or not (source / CARD_FILE).is_file():
        return None
    text = source.joinpath(CARD_FILE).read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        head = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    value = head.get("license") if isinstance(head, dict) else None
    return value if isinstance(value, str) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_output(folder: Path) -> bool:
    """Whether `folder` is a moepress output (has a plan and a manifest)."""
    return (folder / PLAN_FILE).is_file() and (folder / MANIFEST_FILE).is_file()


def build_card(folder: str | Path, source: str | Path | None = None) -> str:
    """The card of a moepress output `folder` (config.json, plan, manifest, and its eval results if any).
    `source`: the original checkpoint folder, when at hand (its config's hub id, its card's license)."""
    folder = Path(folder)
    config = _json(folder / "config.json") or {}
    plan = CompressionPlan.load(folder / PLAN_FILE)
    manifest = Manifest.model_validate_json((folder / MANIFEST_FILE).read_text())
    src = Path(source) if source is not None else None
    if src is None and manifest.source_path and Path(manifest.source_path).is_dir():
        src = Path(manifest.source_path)
    source_config = _json(src / "config.json") if src is not None else None
    return render_card(
        config,
        plan,
        manifest,
        base_model=base_model_id(manifest.source_path, source_config),
        license=_source_license(src),
        eval_result=_json(folder / EVAL_FILE),
    )


def write_model_card(folder: str | Path, source: str | Path | None = None) -> Path:
    """Write `folder/README.md` from the finished folder's files (see `build_card`); returns its path."""
    path = Path(folder) / CARD_FILE
    _write_atomic(path, build_card(folder, source))
    return path


def update_card_eval(folder: str | Path, result: Mapping[str, Any]) -> Path | None:
    """After `moepress eval` on a moepress output: (re)write its card's evaluation section from `result`,
    keeping the rest of the card (a folder without a card gets a whole one). Folders that are not
    moepress outputs, or that cannot be written, are left alone (None)."""
    folder = Path(folder)
    if not folder.is_dir() or not is_output(folder):
        return None
    path = folder / CARD_FILE
    try:
        if path.is_file():
            card = with_eval(path.read_text(encoding="utf-8"), result)
        else:
            card = with_eval(build_card(folder), result)
        _write_atomic(path, card)
    except (OSError, ValueError, MoepressError):
        return None
    return path
