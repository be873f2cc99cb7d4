"""Write a compressed model as a Hugging Face checkpoint folder, atomically and verified.

The folder holds safetensors shards (`save_pretrained`, original key format), config.json, the
source's tokenizer files, `moepress_plan.json` (+ novice sidecar) and `moepress_manifest.json`.

- Expressible in the source architecture (uniform pruning, nothing else): a plain config of the
  source `model_type` with the expert count updated; `AutoModelForCausalLM.from_pretrained` loads it
  with no custom code (and vLLM/SGLang can serve it).
- Novices only, every router row kept (MoNE and its ablations, `frequency+novice`, `variance`), in a
  family whose experts are stored one tensor per expert on disk: vLLM's native MoNE format
  (`moepress/modules/approximate.py`): the source model_type with `config.approximate_experts`,
  retained experts under their original ids, `<experts>.<id>.approx_value` per novice. vLLM >= 0.33
  serves it as it is, older vLLM through moepress's plugin; plain transformers refuses it (the stacked
  experts have the wrong count), `moepress.load` and `trust_remote_code=True` (auto_map) load it.
  `novice_format="moepress"` writes the next form instead.
- Otherwise: config.json carries `moepress_structure`, its own `model_type` (`moepress_deepseek_v2`)
  and `architectures` (`MoepressDeepseekV2ForCausalLM`), and an `auto_map` for AutoConfig and
  AutoModelForCausalLM to `modeling_moepress.py` (subclasses of the family's config and model classes;
  the model rebuilds the changed layers in `__init__`) next to a copy of `moepress/modules/compressed.py`
  (`moepress_modules.py`). Plain transformers refuses it without `trust_remote_code=True` (it does not
  know the model_type) instead of loading the source architecture silently wrong, and loads it right
  with it; `moepress.load` loads it without running the folder's code.
- From a remote-code source (DeepSeekMoE-16B): the source's modeling files are copied too and the
  result stays remote code — plain when expressible (the source's own code, expert count updated),
  else `modeling_moepress.py` subclasses the source's classes from the copied files.

The folder is built in a temporary sibling `OUT.tmp-*`, reloaded, and its logits on a few token ids
compared with the in-memory model before it is renamed into place.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from moepress.atomic import atomic_dir, check_output
from moepress.errors import MoepressError
from moepress.io.load import load  # noqa: F401 - re-exported (moepress.io.save.load)
from moepress.io.manifest import MANIFEST_FILE, Manifest, moepress_version
from moepress.io.model_card import write_model_card
from moepress.io.quantized import keep_input_format, quantize_output
from moepress.io.sizes import size_by_component
from moepress.io.verify import probe_ids, verify_checkpoint  # noqa: F401 - probe_ids: re-exported
from moepress.modules import approximate
from moepress.modules.model_type import (
    compressed_class_name,
    compressed_model_type,
    is_compressed_class,
    source_model_type,
)
from moepress.plan import CompressionPlan

PLAN_FILE = "moepress_plan.json"
MODELING_FILE = "modeling_moepress.py"
MODULES_FILE = "moepress_modules.py"
APPROXIMATE_FILE = "moepress_approximate.py"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_MODELING = '''"""Loads this moepress-compressed checkpoint: the {base} architecture
with the per-layer changes in `config.moepress_structure` (pruned or novice experts, condensed or
dropped MLPs), rebuilt before the weights load. The checkpoint has its own model_type, so that a loader
knowing only `{source_type}` refuses it rather than building the uncompressed architecture. Written by
moepress {version}; needs only torch and transformers."""

from {config_module} import {config_base} as _BaseConfig
from {module} import {base} as _Base

from .moepress_modules import {helpers}
{register}

class {config_class}(_BaseConfig):
    model_type = "{model_type}"


class {model_class}(_Base):
    config_class = {config_class}

    def __init__(self, config):
        super().__init__(config)
        apply_structure(self, config.moepress_structure)

    @classmethod
    def _can_set_experts_implementation(cls):
        return _Base._can_set_experts_implementation()  # transformers asks this file, which lacks the marker
'''


_NATIVE_MODELING = '''"""Loads this checkpoint, in vLLM's native MoNE format (`config.approximate_experts`: novice
experts as constant vectors, retained experts under their original ids), with transformers: the
{base} architecture whose novice layers are rebuilt before the weights load and filled after.
Written by moepress {version}; needs only torch and transformers. Without `trust_remote_code=True`
transformers refuses this folder (the stored experts do not have the configured count).
"""

from {module} import {base} as _Base

from .moepress_approximate import IGNORED_MISSING, IGNORED_UNEXPECTED, fill_native, prepare_config
from .moepress_modules import apply_structure

# where the family's router and experts live (written by moepress's adapter for {source_type})
TEMPLATE = {template}


class {model_class}(_Base):
    _keys_to_ignore_on_load_missing = IGNORED_MISSING
    _keys_to_ignore_on_load_unexpected = IGNORED_UNEXPECTED

    @classmethod
    def is_custom_code(cls):
        return False  # the family's own weight renames apply (transformers skips them for custom classes)

    @classmethod
    def _can_set_experts_implementation(cls):
        return _Base._can_set_experts_implementation()  # transformers asks this file, which lacks the marker

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        structure = getattr(config, "moepress_structure", None)
        if structure:
            apply_structure(self, structure)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        if getattr(config, "quantization_config", None):
            raise ValueError("this checkpoint's retained experts are quantised, which this file cannot read: load it "
                             "with moepress.load(folder) (pip install moepress) or serve it with vLLM")
        prepare_config(config, TEMPLATE)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        fill_native(model, pretrained_model_name_or_path)
        return model

'''


def native_candidate(model: nn.Module, structure: dict | None) -> bool:
    """Whether the plan's result fits vLLM's native novice format: every changed layer keeps all its
    router rows and replaces some experts by novices, and the base is transformers' own class."""
    if not structure or not structure["layers"] or structure["base"]["module"].startswith("."):
        return False
    if structure.get("expert_parts") or structure.get("sized_by_block"):
        return False
    count = approximate.num_experts(model.config, structure["num_experts_key"])
    return all(
        spec["action"] == "prune" and spec["experts"] == list(range(count)) and spec["novices"]
        for spec in structure["layers"].values()
    )


def native_layer(model: nn.Module, structure: dict, idx: int) -> bool:
    """Whether built novice layer `idx` can be written natively: a `NoviceExperts` whose family stores
    experts one tensor per expert on disk (a fused disk layout has no per-expert names to keep)."""
    from moepress.modules.compressed import NoviceExperts

    layer = model.get_submodule(structure["layers_path"])[idx]
    if not isinstance(layer.get_submodule(structure["mlp"]).get_submodule(structure["experts"]), NoviceExperts):
        return False
    try:
        approximate.layer_expert_names(model, structure, idx)
    except ValueError:
        return False
    return True


def native_structure(model: nn.Module, structure: dict | None) -> bool:
    """Whether `model` (with `structure`, every layer built) is written in vLLM's native novice format."""
    return native_candidate(model, structure) and all(
        native_layer(model, structure, int(i)) for i in structure["layers"]
    )


def native_modeling_source(structure: dict, source_type: str) -> str:
    """`modeling_moepress.py` of a native-format checkpoint (its auto_map's AutoModelForCausalLM)."""
    template = {k: v for k, v in structure.items() if k != "layers"}
    return _NATIVE_MODELING.format(
        base=structure["base"]["class"],
        module=structure["base"]["module"],
        version=moepress_version(),
        source_type=source_type,
        template=repr(template),
        model_class=compressed_class_name(structure["base"]["class"]),
    )


def source_class(cls: type) -> type:
    """The source family's config or model class behind `cls` (which may be a compressed checkpoint's own)."""
    return next(c for c in cls.__mro__ if not is_compressed_class(c.__name__))


def _import_module(cls: type) -> str:
    """Where `modeling_moepress.py` imports `cls` from: transformers, or a file beside it (`.configuration_x`)."""
    import transformers

    if cls.__module__.startswith("transformers."):
        return "transformers" if getattr(transformers, cls.__name__, None) is cls else cls.__module__
    return "." + cls.__module__.rsplit(".", 1)[-1]


def modeling_source(structure: dict, config_cls: type, source_type: str) -> str:
    """`modeling_moepress.py`: the source family's config and model classes (from transformers, or the
    source's copied remote code) under the checkpoint's own model_type, the model's `__init__` also
    rebuilding the changed layers."""
    base = structure["base"]
    config_base = source_class(config_cls)
    model_type = compressed_model_type(source_type)
    remote = base["module"].startswith(".")
    register = "" if remote else f'\nregister_weight_conversions("{model_type}", "{source_type}")\n'
    helpers = "apply_structure" if remote else "apply_structure, register_weight_conversions"
    return _MODELING.format(
        base=base["class"],
        source_type=source_type,
        version=moepress_version(),
        config_module=_import_module(config_base),
        config_base=config_base.__name__,
        module=base["module"],
        helpers=helpers,
        register=register,
        config_class=compressed_class_name(config_base.__name__),
        model_class=compressed_class_name(base["class"]),
        model_type=model_type,
    )


def save_compressed(
    model: nn.Module,
    plan: CompressionPlan,
    out: str | Path,
    *,
    source: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    verify: bool = True,
    novice_format: str = "native",
    quantize: str | None = None,
    calibration: torch.Tensor | None = None,
) -> Path:
    """Write `model` (compressed by `apply_plan(model, plan)`) to the folder `out` and return it.

    `source` is the original checkpoint folder (default: where the model was loaded from); its
    tokenizer files (and, for remote code, modeling files) are copied, and it is never written.
    `verify` reloads the written folder and compares logits (needs memory for a second copy).
    `novice_format`: "native" writes novice-only outputs in vLLM's native format where the family
    allows (see the module docstring), "moepress" always in moepress's own.
    `quantize` (a float input only): the verified folder rewritten as compressed-tensors `fp8`, `w4a16`, ...
    (`moepress.quant.export`; `calibration`: token ids for the calibrated schemes), then verified again.
    """
    if quantize is not None:
        from moepress.quant.export import check_quantize

        check_quantize(quantize, source if source is not None else getattr(getattr(model, "moepress_source", None),
                                                                           "path", None))
    if novice_format not in ("native", "moepress"):
        raise MoepressError(f"novice_format is 'native' or 'moepress', not {novice_format!r}")
    record = getattr(model, "moepress_source", None)
    if record is None:
        raise MoepressError("the model was not compressed by moepress; call moepress.surgery.apply_plan first")
    if source is None and record.path and Path(record.path).is_dir():
        source = record.path
    source = Path(source) if source is not None else None
    out = check_output(out, overwrite, inputs=(source,) if source else ())
    structure = getattr(model.config, "moepress_structure", None)
    remote = _remote_base(model)
    from moepress.quant import folder_scheme

    scheme = folder_scheme(source) if source is not None else None

    native = novice_format == "native" and not remote and native_structure(model, structure)

    with atomic_dir(out, overwrite) as tmp:
        if native:
            try:
                _write_folder(model, plan, tmp, source, max_shard_size, native=True)
                if verify:
                    verify_checkpoint(model, tmp, plain=False)
            except OSError:  # the disk, not the format: nothing to fall back to
                raise
            except Exception as err:  # noqa: BLE001 - any failure of the native form falls back to moepress's own
                # a family whose save-time conversion does not invert cleanly (renames the loader reads
                # differently, hybrid caches): the moepress format is exact for every family
                warnings.warn(f"novices written in moepress's format, not vLLM's native one: {err}", stacklevel=2)
                for child in tmp.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                native = False
        if not native:
            _write_folder(model, plan, tmp, source, max_shard_size, native=False)
            if verify:
                verify_checkpoint(model, tmp, plain=structure is None and not remote, trust_remote_code=remote)
        if scheme is not None:  # the input's quantised format, checked against the model it stores
            keep_input_format(model, tmp, source, scheme, plain=structure is None and not native and not remote,
                              trust_remote_code=remote, verify=verify)
        if quantize is not None:  # --quantize: the float folder, verified, rewritten in compressed-tensors
            quantize_output(model, tmp, source, quantize, plain=structure is None and not native and not remote,
                            trust_remote_code=remote, verify=verify, calibration=calibration)
    return out


def _float_config(path: Path) -> None:
    """The weights are written in float: a quantised input's `quantization_config` (which the loaded model's
    config keeps) would make loaders look for scales (`keep_input_format` writes the output's own)."""
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_folder(
    model: nn.Module, plan: CompressionPlan, tmp: Path, source: Path | None, max_shard_size, native: bool
) -> None:
    if native:  # the tensors under the native format's names, already in the on-disk layout
        state = approximate.native_state(model, model.config.moepress_structure)
        model.save_pretrained(tmp, state_dict=state, save_original_format=False, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
    finish_folder(tmp, model, plan, source, native=native)
    _index_single_shard(tmp)


def _index_single_shard(folder: Path) -> None:
    """Give a one-file checkpoint an index when other safetensors lie beside it (the plan's tensors):
    a loader that finds no index reads every top-level `*.safetensors` as weights (vLLM does)."""
    if (folder / "model.safetensors.index.json").is_file() or not (folder / "model.safetensors").is_file():
        return
    if not any(f.name != "model.safetensors" for f in folder.glob("*.safetensors")):
        return
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = {
        "metadata": {"total_size": (folder / "model.safetensors").stat().st_size},
        "weight_map": dict.fromkeys(sorted(names), "model.safetensors"),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _remote_base(model: nn.Module) -> bool:
    """Whether the model's base architecture is code that travels with the checkpoint, not transformers'
    (a model `moepress.load` rebuilt from an output has a class of its own, on a transformers base)."""
    structure = getattr(model.config, "moepress_structure", None)
    if structure is not None:
        return structure["base"]["module"].startswith(".")
    return not type(model).__module__.startswith("transformers.")


def finish_folder(
    tmp: Path, model: nn.Module, plan: CompressionPlan, source: Path | None, native: bool = False
) -> None:
    """Everything beside the weights: modeling files, config's auto_map, tokenizer, plan, manifest
    (`native`: the weights are in vLLM's native novice format)."""
    record = model.moepress_source
    structure = getattr(model.config, "moepress_structure", None)
    remote = _remote_base(model)
    if remote:
        _copy_remote_code(model, source, tmp)
    source_type = source_model_type(model.config.model_type)
    config_class = compressed_class_name(source_class(type(model.config)).__name__)
    modules = Path(__file__).parents[1] / "modules"
    if native:
        (tmp / MODELING_FILE).write_text(native_modeling_source(structure, source_type))
        shutil.copyfile(modules / "compressed.py", tmp / MODULES_FILE)
        # the copy imports its sibling under the sibling's name in the folder
        code = (modules / "approximate.py").read_text()
        code = code.replace("from .compressed import", "from .moepress_modules import")
        (tmp / APPROXIMATE_FILE).write_text(code)
        _finish_native_config(tmp / "config.json", structure)
    else:
        if structure is not None:
            (tmp / MODELING_FILE).write_text(modeling_source(structure, type(model.config), source_type))
            shutil.copyfile(modules / "compressed.py", tmp / MODULES_FILE)
        _finish_config(tmp / "config.json", structure, source_type, config_class)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    plan.save(tmp / PLAN_FILE)
    _float_config(tmp / "config.json")
    params, nbytes = size_by_component(model, record.adapter)
    manifest = Manifest(
        moepress_version=moepress_version(),
        source_fingerprint=record.fingerprint,
        source_path=record.path,
        plan_method=plan.method,
        plain_architecture=structure is None,
        params_before=record.params,
        params_after=params,
        bytes_before=record.bytes,
        bytes_after=nbytes,
        dense_layers=record.dense_layers,
    )
    (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=1) + "\n")
    write_model_card(tmp, source)  # README.md: the Hugging Face model card


def _finish_config(path: Path, structure: dict | None, source_type: str, config_class: str) -> None:
    """Point `auto_map` at files in the folder; a compressed structure gets its own model_type and
    architecture, both mapped to modeling_moepress (`config_class`: its config class's name)."""
    config = json.loads(path.read_text())
    # hub references ("org/repo--modeling_x.Cls") become local: the code now lives in the folder
    auto_map = {k: v.split("--")[-1] for k, v in config.get("auto_map", {}).items()}
    if structure is not None:
        # only these two: other auto classes (AutoModel, ...) would build the uncompressed architecture
        modeling = Path(MODELING_FILE).stem
        model_class = compressed_class_name(structure["base"]["class"])
        auto_map = {
            "AutoConfig": f"{modeling}.{config_class}",
            "AutoModelForCausalLM": f"{modeling}.{model_class}",
        }
        config["model_type"] = compressed_model_type(source_type)
        config["architectures"] = [model_class]
    if auto_map:
        config["auto_map"] = auto_map
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _finish_native_config(path: Path, structure: dict) -> None:
    """The source architecture's config plus `approximate_experts`, and an auto_map that only
    `trust_remote_code=True` follows (transformers' own class for the model_type wins otherwise)."""
    config = json.loads(path.read_text())
    config.pop("moepress_structure", None)
    source_type = source_model_type(config["model_type"])
    base = structure["base"]["class"]
    config["model_type"] = source_type
    config["architectures"] = [base]
    config[approximate.CONFIG_KEY] = {
        idx: sorted(spec["novices"]) for idx, spec in sorted(structure["layers"].items(), key=lambda kv: int(kv[0]))
    }
    config["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{compressed_class_name(base)}"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_remote_code(model: nn.Module, source: Path | None, dst: Path) -> None:
    """The source's own modeling/configuration files: all top-level .py of a local source folder,
    else the files the model's and config's classes were loaded from (with their relative imports)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    if source is not None and any(source.glob("*.py")):
        files = set(source.glob("*.py"))
    else:
        files = set()
        for cls in (source_class(type(model)), source_class(type(model.config))):
            if not cls.__module__.startswith("transformers."):
                f = Path(inspect.getfile(cls))
                files |= {f, *map(Path, get_relative_import_files(str(f)))}
    for f in files:
        shutil.copyfile(f, dst / f.name)
