"""Checks that the inputs alone decide, run before any weight is read: a mistake costs seconds, not a
model load (or, worse, a search that cannot succeed).

Config level: the model folder holds config.json and readable safetensors headers, the family is one
moepress supports, and counts (`--experts`, `--layers`, `--ratio`, `--memory-budget`) and plans fit
the model's layers and experts. These are answered by an empty ("meta") copy of the model built from
its config: the adapter reads layers, routed experts and top-k from it exactly as from the real model,
and no tensor holds data. Data level: the text file is present, UTF-8 and non-empty, and the
tokenizer alone (milliseconds to load) finds enough tokens for n × seq-len.

Each check raises `MoepressError` with a one-line message naming the fix; a check that cannot be
answered without the weights (a hub id offline, a compressed output's custom structure) is left to
the real load, which reports it the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from moepress.errors import MoepressError


def is_local(path: str | Path) -> bool:
    """Whether `path` names a local folder (or means to: ./x, /x, ~/x), as opposed to a hub id."""
    return Path(path).expanduser().exists() or str(path).startswith((".", "/", "~"))


def check_model_folder(path: str | Path, allow_pickle: bool = False) -> None:
    """A local checkpoint folder exists, has config.json and weights whose headers read (no weight is read)."""
    from moepress.models.loading import check_checkpoint

    if is_local(path):
        check_checkpoint(Path(path).expanduser(), allow_pickle)


def local_config(path: str | Path) -> dict | None:
    """config.json of a local folder as a dict (None for a hub id or a folder without one)."""
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # check_model_folder says so in one line


def max_position(path: str | Path) -> int | None:
    """The longest sequence the model's config allows (None: unknown before loading)."""
    config = local_config(path)
    value = None if config is None else config.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def meta_model(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False):
    """An empty copy of the model ("meta" tensors, built from config.json alone) whose family moepress
    supports, or None when the config alone cannot build one (a hub id offline, a moepress output's
    custom structure): the real load then reports the problem.

    Raises for a wrong folder, corrupt shard headers, remote code without `trust_remote_code`, an
    unknown model_type, a dense or unsupported family: what the real load would refuse, without
    reading a weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moepress.models import get_adapter
    from moepress.models.loading import _unknown_model_type

    check_model_folder(path, allow_pickle)
    raw = local_config(path) if is_local(path) else None
    if raw is not None and "moepress_structure" in raw:
        return None  # a compressed output: its structure is rebuilt (and checked) by the real load
    if raw is not None and "auto_map" in raw and not trust_remote_code:
        raise MoepressError(
            f"{path} needs its own modeling code (auto_map); pass --trust-remote-code if you trust it"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        if raw is not None:
            _unknown_model_type(Path(path).expanduser())  # one line when transformers lacks the model_type
        return None
    except Exception:  # noqa: BLE001 - anything else the config cannot tell is checked after the real load
        return None
    compressed = is_local(path) and (Path(path).expanduser() / "moepress_plan.json").exists()
    get_adapter(model, require_moe=not compressed)  # dense or unknown family: the load's own message
    return model


def check_experts(method: str, experts: int | None, blocks) -> None:
    """cd-moe-sr's `--experts` (routed experts kept per condensed layer) against the MoE blocks it may
    condense: 1..E, E the fewest routed experts among them. None is the method's default (top-k)."""
    if experts is None or not blocks:
        return
    fewest = min(b.num_experts for b in blocks)
    if experts > fewest:
        raise MoepressError(
            f"{method} --experts {experts} is more than the {fewest} routed experts per MoE layer; use --experts "
            f"1 to {fewest} (or leave it out to keep the model's top-{blocks[0].top_k})"
        )


def check_plan(plan, model) -> None:
    """A plan against a (meta) model: its layers exist and are MoE layers, its expert ids are below the
    layer's routed experts, pruned layers keep top-k. (The fingerprint needs weights: checked at load.)"""
    plan.model_copy(update={"model_fingerprint": None}).validate_for(model)


def check_text(source: str | Path | None) -> None:
    """A local data file is present, UTF-8 and holds some text (a dataset name is checked when it loads)."""
    from moepress.data import load_texts
    from moepress.data.text import LOCAL_SUFFIXES

    if source is None:
        return
    p = Path(source)
    if p.suffix in LOCAL_SUFFIXES or p.exists():
        load_texts(source)


def check_inputs(
    models: Iterable[str | Path | None] = (),
    texts: Iterable[str | Path | None] = (),
    allow_pickle: bool = False,
) -> None:
    """The cheap checks for commands that only read checkpoints and text (eval, bench, finetune, demo):
    every local model folder is a readable checkpoint, every text file readable, non-empty text."""
    for m in models:
        if m is not None:
            check_model_folder(m, allow_pickle)
    for t in texts:
        check_text(t)


def calibration_batch(model_path: str | Path, data: str | Path, n: int, seq_len: int, seed: int = 0,
                      tokenizer=None):
    """(tokenizer, packed calibration tokens) from the tokenizer alone: too little text, a sequence
    longer than the config allows, an empty or non-UTF-8 file fail here, before the model loads."""
    from moepress.data import load_tokens
    from moepress.models.loading import load_tokenizer

    if n <= 0:
        raise MoepressError(f"-n must be positive (got {n}); use -n 128 for example")
    tokenizer = tokenizer or load_tokenizer(model_path)
    return tokenizer, load_tokens(tokenizer, data, n, seq_len, seed, max_position=max_position(model_path))
