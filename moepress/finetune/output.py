"""Fine-tune a written output folder's condensed layers and write the result as a new output folder
(`moepress finetune OUT --data train.txt --tokens 2M [--sft pairs.jsonl] [--recipe fast] -o OUT2`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from moepress.errors import MoepressError

FINETUNE_FILE = "moepress_finetune.json"
SFT_MAX_LENGTH = 256  # the reference's --max-length, whatever the LM stage's --seq-len
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGbB]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int) -> int:
    """A token count such as 2000000, 2M, 500k or 1.5M (k = 10³, M = 10⁶, G/B = 10⁹)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise MoepressError(f"cannot read token count {text!r}; write e.g. 2M, 500k or 2000000")
        value = math.floor(float(m.group(1)) * _SCALE[m.group(2).lower()])
    if value < 1:
        raise MoepressError(f"token count must be positive (got {text!r})")
    return value


def source_record(model, folder: Path):
    """What `save_compressed` needs to know about the original, rebuilt from the folder's manifest."""
    from moepress.io.manifest import MANIFEST_FILE, Manifest
    from moepress.models import get_adapter
    from moepress.surgery import SourceRecord

    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise MoepressError(f"{folder} has no {MANIFEST_FILE}; give a folder written by `moepress compress`")
    m = Manifest.model_validate_json(path.read_text())
    return SourceRecord(
        fingerprint=m.source_fingerprint, path=m.source_path, params=m.params_before, bytes=m.bytes_before,
        adapter=get_adapter(model, require_moe=False),
    )


def eval_windows(tokenizer, source: str | Path, seq_len: int, max_tokens: int):
    """Held-out ids as rows of `seq_len` tokens (each scored as one window), at most `max_tokens`."""
    from moepress.evaluate.perplexity import load_eval_ids

    ids = load_eval_ids(tokenizer, source, max_tokens=max_tokens)
    rows = len(ids) // seq_len
    if rows == 0:
        raise MoepressError(f"held-out text {source} gives {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return ids[: rows * seq_len].view(rows, seq_len)


def finetune_output(
    out: str | Path,
    data: str | Path,
    tokens: int | str,
    dest: str | Path,
    *,
    eval_data: str | Path | None = None,
    eval_tokens: int | str = 65536,
    recipe: str = "reference",
    sft: str | Path | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
):
    """Fine-tune the condensed layers of the output folder `out` on about `tokens` tokens of `data`
    (then one epoch over the prompt/answer pairs of the .jsonl `sft`, when given) under `recipe`
    (`moepress.finetune.RECIPES`; `seq_len`, `lr`, `batch_size` override it when not None) and write
    `dest` (checkpoint, plan, manifest, the statistics `out` had, `moepress_finetune.json` with the
    recipe's resolved hyperparameters). Perplexity before and after is measured on `eval_data`
    (held-out text, never the training file). Returns (dest, FinetuneResult)."""
    from moepress.atomic import atomic_dir, check_output
    from moepress.compression import copy_stats, write_checkpoint, write_report_if_available
    from moepress.finetune.sft import read_sft_pairs, tokenize_sft
    from moepress.finetune.train import finetune, load_train_ids, resolve_recipe
    from moepress.io.save import PLAN_FILE
    from moepress.models.loading import load_model, resolve_device
    from moepress.plan import CompressionPlan, Condense

    out = Path(out)
    tokens, eval_tokens = parse_count(tokens), parse_count(eval_tokens)
    dest = check_output(dest, overwrite, inputs=(out,))
    if not (out / PLAN_FILE).is_file():
        raise MoepressError(f"{out} is not a moepress output (no {PLAN_FILE}); give a compress output")
    if not Path(data).is_file():
        raise MoepressError(f"training text {data} does not exist; pass a .txt or .jsonl file")
    if eval_data is not None:
        if not Path(eval_data).is_file():
            raise MoepressError(f"held-out text {eval_data} does not exist; pass a .txt or .jsonl file")
        if Path(eval_data).resolve() == Path(data).resolve():
            raise MoepressError("--eval-data is the training file; give held-out text the model never sees")
    resolved = resolve_recipe(recipe, seq_len=seq_len, lr=lr, batch_size=batch_size)
    if resolved.seq_len < 2:
        raise MoepressError(f"--seq-len must be at least 2 (got {resolved.seq_len})")
    pairs = None if sft is None else read_sft_pairs(sft)  # a bad file fails before any weight is read
    plan = CompressionPlan.load(out / PLAN_FILE)
    if not any(isinstance(a, Condense) for a in plan.layers.values()):
        raise MoepressError(f"{out} ({plan.method}) has no condensed layer; only condensed layers train")
    dev = resolve_device(device)
    model, tokenizer = load_model(out, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    model.moepress_source = source_record(model, out)
    seq_len = resolved.seq_len
    train_ids = load_train_ids(tokenizer, data, tokens, seq_len, seed)
    eval_ids = None if eval_data is None else eval_windows(tokenizer, eval_data, seq_len, eval_tokens)
    sft_data = None if pairs is None else tokenize_sft(tokenizer, pairs, max_length=SFT_MAX_LENGTH)
    model, result = finetune(
        model, plan, train_ids, eval_ids, recipe=resolved, tokens=tokens, sft=sft_data, seed=seed,
        gradient_checkpointing=gradient_checkpointing, device=dev,
    )
    with atomic_dir(dest, overwrite) as tmp:
        write_checkpoint(model, plan, tmp, source=out)
        copy_stats(out, tmp)
        record = {
            "source": str(out.resolve()), "data": str(Path(data).resolve()),
            "eval_data": None if eval_data is None else str(Path(eval_data).resolve()),
            "sft": None if sft is None else str(Path(sft).resolve()),
            "sft_skipped": 0 if sft_data is None else sft_data.skipped,
            "seq_len": seq_len, "batch_size": resolved.batch_size, "seed": seed, "device": str(dev),
            "requested_tokens": tokens, **result.to_dict(),
        }
        (tmp / FINETUNE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    write_report_if_available(dest)
    return dest, result
