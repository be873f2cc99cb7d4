"""Apply a plan to a checkpoint and write the result one decoder layer at a time.

For models larger than host memory: the model is a meta-device skeleton (`calibrate.streaming`);
each decoder layer is read from the source shards, compressed in place, written as its own
safetensors shard and released, so memory holds one layer (plus embeddings and head) at a time.
The index file and the rest of the folder (config, modeling files, tokenizer, plan, manifest: the
same `finish_folder` as `save_compressed`) come at the end, in a temporary sibling renamed into
place. Verification is per shard: every tensor is read back and compared bit for bit, and the
keys are checked against the compressed architecture's on-disk layout (transformers' own
`revert_weight_conversion`, as `save_pretrained` uses), since reloading
the whole output to compare logits would need the memory streaming avoids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.modeling_utils import revert_weight_conversion

from moepress.atomic import atomic_dir, check_output
from moepress.calibrate.streaming import Streamer, release
from moepress.errors import MoepressError
from moepress.io.quantized import requantize_output
from moepress.io.save import finish_folder, native_candidate, native_layer
from moepress.modules import approximate
from moepress.plan import CompressionPlan
from moepress.surgery.apply import (
    dense_ids,
    finish_model,
    prepare,
    rebuild_layer,
    source_record,
    uniform_expert_count,
)

INDEX_FILE = "model.safetensors.index.json"


def save_compressed_streaming(
    source: str | Path,
    plan: CompressionPlan,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    dense_layers: str = "auto",
    novice_format: str = "native",
) -> Path:
    """Write `plan` applied to the checkpoint folder `source` into `out`, one layer at a time
    (`dense_layers` as for `apply_plan`, `novice_format` as for `save_compressed`)."""
    source = Path(source)
    out = check_output(out, overwrite, inputs=(source,))
    config = source / "config.json"
    if config.is_file() and "moepress_structure" in json.loads(config.read_text()):
        # its own model_type builds no skeleton from the config alone; the original is what plans apply to
        raise MoepressError(f"{source} is already compressed by moepress; apply plans to the original model")
    streamer = Streamer(source, "cpu", dtype, trust_remote_code)
    try:
        model = streamer.model
        model.config._name_or_path = str(source)
        adapter, blocks, structure = prepare(model, plan, dense_layers)
        del blocks  # they reference the original experts modules, which must be freed layer by layer
        record = source_record(model, adapter)
        uniform = uniform_expert_count(model, plan, adapter, dense=dense_ids(structure))
        # decided for good at the first novice layer built (a family stores all its layers alike); the
        # layers before it are the same in both formats
        native = novice_format == "native" and native_candidate(model, structure)
        checked = False
        with atomic_dir(out, overwrite) as tmp:
            weight_map: dict[str, str] = {}
            total = len(streamer.layers) + 1
            for i, layer in enumerate(streamer.layers):
                layer = streamer.load_layer(i)
                replaced = list(layer.modules())  # the modules rebuilding may swap out of the layer
                if str(i) in structure["layers"]:
                    rebuild_layer(model.config, structure, layer, adapter.block(i, layer), plan, i, adapter=adapter)
                state = {f"{streamer.prefixes[i]}.{k}": v for k, v in layer.state_dict().items()}
                if native and not checked and str(i) in structure["layers"]:
                    native, checked = native_layer(model, structure, i), True
                if native:  # retained experts under their original ids, plus the novices' approx_value
                    state = approximate.native_layer_state(model, structure, i, streamer.prefixes[i])
                else:  # the on-disk layout save_pretrained writes (e.g. per-expert tensors where memory fuses them)
                    state = revert_weight_conversion(model, state)
                _write_shard(tmp, f"model-{i + 1:05d}-of-{total:05d}.safetensors", state, weight_map)
                streamer.release_layer(i)
                for module in replaced:
                    release(module)
            in_layers = tuple(f"{p}." for p in streamer.prefixes)
            rest_all = {k: v for k, v in model.state_dict().items() if not k.startswith(in_layers)}
            rest = revert_weight_conversion(model, _untied(rest_all))
            _write_shard(tmp, f"model-{total:05d}-of-{total:05d}.safetensors", rest, weight_map)
            finish_model(model, adapter, structure, record, uniform)
            model.config.save_pretrained(tmp)
            if (source / "generation_config.json").is_file():
                (tmp / "generation_config.json").write_bytes((source / "generation_config.json").read_bytes())
            finish_folder(tmp, model, plan, source, native=native)
            sizes = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _check_keys(model, weight_map, tied=set(rest_all) - set(_untied(rest_all)), native=native)
            if streamer.ckpt.scheme is not None:  # the input's FP8 / MXFP4 format: sliced weights copied as stored
                requantize_output(tmp, source, streamer.ckpt.scheme)
    finally:
        streamer.close()
    return out


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings): the loader re-ties."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def _write_shard(folder: Path, name: str, state: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    """Write one shard and read it back: every tensor must come back bit for bit."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(state, folder / name, metadata={"format": "pt"})
    with safe_open(folder / name, "pt") as f:
        for k, v in state.items():
            if not torch.equal(f.get_tensor(k), v):
                raise MoepressError(f"shard {name} does not read back tensor {k}; check the disk and rerun")
    weight_map.update(dict.fromkeys(state, name))


def _check_keys(model: torch.nn.Module, weight_map: dict[str, str], tied: set[str], native: bool = False) -> None:
    """The written keys are exactly the compressed model's in its on-disk layout (`native`: in vLLM's
    native novice format), less `tied` ones."""
    if native:
        expected = set(approximate.native_state(model, model.config.moepress_structure)) - tied
    else:
        meta = {k: v for k, v in model.state_dict().items() if k not in tied}
        expected = set(revert_weight_conversion(model, meta))
    missing, extra = expected - set(weight_map), set(weight_map) - expected
    if missing or extra:
        raise MoepressError(
            f"streamed checkpoint keys do not match the compressed model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}); please report this model"
        )
