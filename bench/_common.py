"""Helpers shared by the quality benchmarks on the bundled mini checkpoints (cd_moe_quality.py,
pruning_quality.py): where the checkpoints and text are, dev-set measurement against cached
reference logits, the bytes a written checkpoint holds, and the run's environment for the JSON.

Importing this module puts the repository root on sys.path, so the scripts run from a plain
checkout (`python bench/x.py`) without installing moepress.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moepress.evaluate.divergence import DivergenceSums, divergence_sums  # noqa: E402
from moepress.evaluate.perplexity import token_nll_sum  # noqa: E402

# ../shared next to the repository (the checkout on a remote device has the same layout)
SHARED = ROOT.parent / "shared"
MODELS = ("dsv2-mini", "qwen2moe-mini", "olmoe-mini")

# bytes per element of the safetensors dtypes a checkpoint of ours can hold
SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
                        "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@torch.no_grad()
def dev_logits(model, ids: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    """The model's logits on every row of `ids`, one tensor per batch (the reference for `measure`)."""
    model.eval()
    return [model(input_ids=b.to(device), use_cache=False).logits for b in ids.split(batch_size)]


@torch.no_grad()
def measure(model, ids, reference: list[torch.Tensor], batch_size: int, device) -> dict:
    """Dev perplexity (every next token of every row), JS / KL / top-1 agreement to the original, and the
    logits' relative RMS distance to the original's."""
    model.eval()
    nll, tokens, div, diff, norm = 0.0, 0, DivergenceSums(), 0.0, 0.0
    for b, ref in zip(ids.split(batch_size), reference, strict=True):
        logits = model(input_ids=b.to(device), use_cache=False).logits
        nll += token_nll_sum(logits[:, :-1], b[:, 1:].to(device))
        tokens += b[:, 1:].numel()
        div.add(divergence_sums(ref, logits))
        diff += (logits.float() - ref.float()).pow(2).sum().item()
        norm += ref.float().pow(2).sum().item()
    d = div.mean()
    return {"ppl": math.exp(nll / tokens), "js": d.js, "kl": d.kl, "top1": d.top1_agreement,
            "logit_distance": (diff / norm) ** 0.5}


def reference_measure(ids: torch.Tensor, reference: list[torch.Tensor], batch_size: int) -> dict:
    """What `measure` gives the original model itself, from its reference logits (no forward pass)."""
    nll = sum(token_nll_sum(ref[:, :-1], b[:, 1:].to(ref.device))
              for b, ref in zip(ids.split(batch_size), reference, strict=True))
    return {"ppl": math.exp(nll / ids[:, 1:].numel()), "js": 0.0, "kl": 0.0, "top1": 1.0,
            "logit_distance": 0.0}


def shard_files(folder: Path) -> list[Path]:
    """The safetensors weight shards of a checkpoint folder (sidecars such as novice files excluded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


def written_size(folder: Path) -> tuple[int, int]:
    """(parameters, tensor bytes) stored in a checkpoint's weight shards, read from their headers."""
    params = nbytes = 0
    for shard in shard_files(Path(folder)):
        with shard.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, t in header.items():
            if key == "__metadata__":
                continue
            n = math.prod(t["shape"])
            start, end = t["data_offsets"]
            if end - start != n * SAFETENSORS_ITEMSIZE[t["dtype"]]:
                raise ValueError(f"{shard.name}: {key} holds {end - start} bytes for shape {t['shape']}")
            params += n
            nbytes += end - start
    return params, nbytes


def environment(device: torch.device) -> dict:
    """Command line, device name and library versions, for the results file."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
