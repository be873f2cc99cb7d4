"""Loading a source model safely: checks that turn common mistakes into one-line errors before
transformers or torch raise from deep inside."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from moepress.errors import MoepressError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The floating dtype a local checkpoint's config says its weights are stored in (None: unknown).

    Outputs are written in it: calibration and search run in float32 on CPU, but a bf16 model must
    not come back as a float32 checkpoint larger than the original."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there), the checkpoint's bf16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise MoepressError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "float16" and torch.device(device).type == "cpu":
        raise MoepressError("float16 is not supported on CPU; use --dtype float32 or bfloat16")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoepressError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoepressError("device cuda was asked for but no GPU is visible; use --device cpu")
    return dev


def check_checkpoint(path: str | Path, allow_pickle: bool = False) -> Path:
    """Raise MoepressError unless `path` is a readable Hugging Face checkpoint folder."""
    folder = Path(path)
    if not folder.exists():
        raise MoepressError(f"model path {folder} does not exist; pass a Hugging Face checkpoint folder")
    if not folder.is_dir():
        raise MoepressError(f"model path {folder} is a file; pass the checkpoint's folder")
    if not (folder / "config.json").is_file():
        raise MoepressError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoepressError(f"{folder}/config.json is not valid JSON; restore it from the source") from None
    from moepress.quant import folder_scheme

    folder_scheme(folder)  # a quantisation format moepress cannot read: one line, before anything loads
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        needed = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(n for n in needed if not (folder / n).is_file())
        if missing:
            raise MoepressError(f"{folder} is missing shard(s) {', '.join(missing[:3])}; download them again")
    if not shards:
        if list(folder.glob("*.bin")) and not allow_pickle:
            raise MoepressError(
                f"{folder} holds only pickle (.bin) weights; pass --allow-pickle to load them with "
                "weights_only=True, or convert to safetensors"
            )
        if not list(folder.glob("*.bin")):
            raise MoepressError(f"{folder} holds no weights (*.safetensors); download the model files")
    for shard in shards:
        _check_safetensors_header(shard)
    return folder


def _check_safetensors_header(shard: Path) -> None:
    """A truncated or corrupt shard fails here with its name, not later inside a load."""
    size = shard.stat().st_size
    try:
        with shard.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8:
                raise ValueError("header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError("size")
    except (ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError):
        raise MoepressError(f"weights file {shard.name} is truncated or corrupt; download it again") from None


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """(model, tokenizer) from a local folder or a hub id; the model in eval mode.

    Remote code runs only with `trust_remote_code`; pickle weights only with `allow_pickle`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(str(device) if device is not None else None)
    dtype = resolve_dtype(dtype, device)
    local = Path(path).exists() or str(path).startswith((".", "/", "~"))
    if local:
        check_checkpoint(path, allow_pickle)
        config = json.loads((Path(path) / "config.json").read_text())
        from moepress.io.load import is_remote_code

        # moepress's own structure, or vLLM's native novice format (ours or the MoNE reference's): moepress
        # builds these without the folder's code
        if ("moepress_structure" in config or config.get("approximate_experts")) and not is_remote_code(config):
            from moepress.io import load as load_compressed

            return load_compressed(path, dtype=dtype, device=device), load_tokenizer(path)
        if "auto_map" in config and not trust_remote_code:
            raise MoepressError(
                f"{path} needs its own modeling code (auto_map); pass --trust-remote-code if you trust it"
            )
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if local:
            _unknown_model_type(Path(path))
        raise MoepressError(f"cannot read the config of {path}: {str(err).splitlines()[0][:160]}") from None
    except OSError:
        raise MoepressError(f"cannot find model {path} locally and the hub is unreachable") from None
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if local:  # FP8 / MXFP4 / compressed-tensors: calibrate and search on the weights dequantised on load
        from moepress.quant.requantize import load_kwargs

        kwargs.update(load_kwargs(path))
    if allow_pickle:
        # a pickle can run code when unpickled; weights_only restricts it to tensors and plain containers
        kwargs.update(use_safetensors=None, weights_only=True)
    from moepress.quant.requantize import passed_config_quietly

    try:
        with passed_config_quietly():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    except pickle.UnpicklingError as err:  # weights_only met something that is not a tensor: refuse it
        why = next((line for line in str(err).splitlines() if "GLOBAL" in line), "not only tensors")
        raise MoepressError(
            f"the pickle weights of {path} hold more than tensors ({why.strip()[:120]}), so they were not "
            "loaded; get a safetensors copy from a source you trust"
        ) from None
    tokenizer = load_tokenizer(path)
    from moepress.models import get_adapter

    # fail early and clearly on unsupported or dense models; a moepress output may have no MoE layer left
    compressed = local and (Path(path) / "moepress_plan.json").exists()
    get_adapter(model, require_moe=not compressed)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise MoepressError(
                f"weight {name} of {path} holds NaN or inf; the checkpoint is damaged: download it again"
            )
    return model, tokenizer


def _unknown_model_type(folder: Path) -> None:
    """Raise the one-line error for a config.json whose model_type this transformers does not know
    (its own ValueError is a paragraph that does not say what moepress can compress)."""
    import transformers
    from transformers import CONFIG_MAPPING

    from moepress.models.base import supported_families
    from moepress.models.families import check_model_type

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        check_model_type(model_type)  # a family of a later transformers: name the release
    if model_type is None or model_type in CONFIG_MAPPING or "auto_map" in config:
        return  # another problem (a remote-code config names its own model_type): the generic message
    raise MoepressError(
        f"{folder}/config.json names model_type {model_type!r}, which transformers {transformers.__version__} "
        f"does not know; check model_type or upgrade transformers (moepress supports "
        f"{', '.join(supported_families())})"
    )


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, config=_tokenizer_config(path))
    except (OSError, ValueError, TypeError):
        raise MoepressError(
            f"{path} has no usable tokenizer (tokenizer.json / tokenizer_config.json); copy the source "
            "model's tokenizer files into it"
        ) from None


def _tokenizer_config(path: str | Path):
    """For a moepress output with its own model_type, a config of its source family for AutoTokenizer
    (which reads a config only to find a tokenizer class): left to itself, AutoTokenizer reads the
    output's config, which only the folder's code knows, and asks on the terminal whether to run it."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    from moepress.modules.model_type import is_compressed_model_type, source_model_type

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    model_type = json.loads(config.read_text()).get("model_type") or ""
    if not is_compressed_model_type(model_type):
        return None
    family = source_model_type(model_type)
    return AutoConfig.for_model(family) if family in CONFIG_MAPPING else PretrainedConfig()
