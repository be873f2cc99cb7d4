"""The common path through the stages (load → tokens → calibrate → plan → apply → write) as plain
functions the CLI, recipes and notebooks share."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moepress.atomic import atomic_dir, check_output
from moepress.calibrate import CalibrationResult, calibrate
from moepress.calibrate.stats import CalibrationStats
from moepress.data import load_documents, load_tokens
from moepress.errors import MoepressError
from moepress.models.loading import load_model
from moepress.plan import model_fingerprint


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def calibration_tokens(model, tokenizer, data: str, n: int, seq_len: int, seed: int = 0):
    return load_tokens(tokenizer, data, n, seq_len, seed, max_position=max_positions(model))


def calibration_documents(model, tokenizer, data: str, n: int, seq_len: int, seed: int = 0):
    """Separate BOS-first documents (the CD-MoE reference's calibration; `moepress.data.documents`)."""
    return load_documents(tokenizer, data, n, seq_len, seed, max_position=max_positions(model))


def run_calibration(
    model_path: str, data: str, *, n: int = 128, seq_len: int = 512, seed: int = 0, batch_size: int = 8,
    device: str = "auto", dtype: str = "auto", out: str | Path | None = None, overwrite: bool = False,
    trust_remote_code: bool = False, keep_moe_inputs: int = 0, model_and_tokenizer=None,
    stream: bool = False, resume: bool = False, allow_pickle: bool = False,
) -> CalibrationResult:
    """Load the model and data, run the layer-by-layer calibration, and write the statistics.

    `stream` reads one decoder layer at a time from the shards (models larger than memory);
    `resume` continues an interrupted run from `OUT.partial/`; under torchrun the sequences are
    split across ranks, statistics merged, and rank 0 writes.
    """
    from moepress.calibrate import distributed
    from moepress.calibrate.resume import calibrate_resumable, finish
    from moepress.models.loading import resolve_device, resolve_dtype

    if n <= 0:
        raise MoepressError(f"-n must be positive (got {n}); use -n 128 for example")
    rank, size = distributed.world()
    if out is not None and rank == 0:
        check_output(out, overwrite or resume, inputs=(model_path,))
    dev = distributed.init_if_needed() or resolve_device(device)
    streamer = None
    if model_and_tokenizer is not None and not stream:
        model, tokenizer = model_and_tokenizer
        batch = calibration_tokens(model, tokenizer, data, n, seq_len, seed)
    else:
        from moepress.preflight import calibration_batch, check_text, meta_model

        # what the inputs decide (data, folder, family, token count) before any weight is read
        check_text(data)
        meta_model(model_path, trust_remote_code, allow_pickle)
        tokenizer, batch = calibration_batch(model_path, data, n, seq_len, seed)
        if stream:
            from moepress.calibrate.streaming import Streamer

            streamer = Streamer(model_path, dev, resolve_dtype(dtype, dev), trust_remote_code)
            model = streamer.model
        else:
            model, _ = load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle)
    meta = {
        "model": str(model_path),
        "model_fingerprint": None if stream else model_fingerprint(model),
        "data": str(data),
        "data_fingerprint": batch.fingerprint,
        "seed": seed,
    }
    ids = distributed.shard(batch.input_ids, rank, size)
    kwargs = dict(batch_size=batch_size, keep_moe_inputs=keep_moe_inputs, device=dev, meta=meta, seed=seed,
                  stream=streamer)
    try:
        if out is not None:
            progress_out = Path(out) if size == 1 else Path(f"{out}.rank{rank}")
            result = calibrate_resumable(model, ids, progress_out, batch.fingerprint, resume, **kwargs)
        else:
            result = calibrate(model, ids, **kwargs)
    finally:
        if streamer is not None:
            streamer.close()
    result.stats = distributed.all_merge(result.stats)
    result.stats.meta.update(meta, num_sequences=int(batch.input_ids.shape[0]))
    if out is not None and rank == 0:
        with atomic_dir(out, overwrite or resume) as tmp:
            result.stats.save(tmp)
    if out is not None:
        finish(progress_out)
    return result


def stats_cache_dir(model, data_fingerprint: str, n: int, seq_len: int) -> Path:
    """Where `compress` keeps statistics so the same model and data are calibrated once."""
    root = Path(os.environ.get("MOEPRESS_CACHE", Path.home() / ".cache" / "moepress"))
    key = hashlib.sha256(f"{model_fingerprint(model)}|{data_fingerprint}|{n}|{seq_len}".encode()).hexdigest()
    return root / "stats" / key[:20]


def _stats_fit(model, stats: CalibrationStats) -> bool:
    """Whether cached statistics have one layer per MoE layer of `model` with its expert count and top-k."""
    from moepress.models import get_adapter

    blocks = get_adapter(model).blocks(model)
    return set(stats.layers) == set(blocks) and all(
        (stats[i].num_experts, stats[i].top_k) == (b.num_experts, b.top_k) for i, b in blocks.items()
    )


def cached_calibration(model, tokenizer, data: str, n: int, seq_len: int, seed: int, batch_size: int,
                       device, keep_moe_inputs: int = 0, batch=None,
                       stream=None) -> tuple[CalibrationStats, dict, object]:
    """Statistics from the cache when the same model+data were calibrated before, else computed.
    `batch`: the calibration tokens when already made (`moepress.preflight`), else tokenised here;
    `stream`: a `calibrate.streaming.Streamer` whose meta-device model is `model` (layers read one at a time)."""
    import torch

    if batch is None:
        batch = calibration_tokens(model, tokenizer, data, n, seq_len, seed)
    cache = stats_cache_dir(model, batch.fingerprint, n, seq_len)
    inputs_file = cache / "moe_inputs.pt"
    if (cache / "stats.json").is_file() and (not keep_moe_inputs or inputs_file.is_file()):
        stats = CalibrationStats.load(cache)
        if _stats_fit(model, stats):  # else made by another moepress (say, counting other expert ids): redo
            moe_inputs = torch.load(inputs_file, weights_only=True) if keep_moe_inputs else {}
            return stats, moe_inputs, batch
    meta = {"model_fingerprint": model_fingerprint(model), "data": str(data),
            "data_fingerprint": batch.fingerprint, "seed": seed}
    result = calibrate(model, batch.input_ids, batch_size=batch_size, keep_moe_inputs=keep_moe_inputs,
                       device=device if stream is None else stream.device, meta=meta, seed=seed, stream=stream)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(cache, overwrite=True) as tmp:
            result.stats.save(tmp)
            if keep_moe_inputs:
                torch.save(result.moe_inputs, tmp / "moe_inputs.pt")
    except (OSError, MoepressError):
        pass  # a cache that cannot be written only costs time
    return result.stats, result.moe_inputs, batch


def write_demo_model(out: str | Path, family: str = "deepseek_v2", overwrite: bool = False, seed: int = 0) -> Path:
    """A tiny random-initialised checkpoint with a byte-level tokenizer: tries the tool with no download."""
    from moepress.models.families import check_model_type
    from moepress.testing import TINY_FAMILIES, declared_families, tiny_model

    known = (*TINY_FAMILIES, *declared_families())
    if family not in known:
        check_model_type(family)  # a family of a later transformers: name the release
        raise MoepressError(f"unknown family {family!r}; choose one of {', '.join(known)}")
    model = tiny_model(family, seed=seed, vocab_size=260, max_position_embeddings=1024)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
    return Path(out)


def byte_tokenizer():
    """A 260-token byte-level tokenizer built offline (256 bytes + 4 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    for i, ch in enumerate(sorted(byte_chars)):
        vocab[ch] = 4 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
