"""Memory and speed of a model as it runs: parameter bytes by component, bytes read per decoded
token, peak accelerator memory, prefill and decode tokens/s, and original-vs-compressed ratios.

Timing: warm-up runs first, then the median of `repeats` runs, timed with CUDA events on a GPU
and `time.perf_counter` on CPU. CPU numbers say little about GPU serving speed; every result
carries its device and `cpu_timing` so nobody quotes them as such. Decoding is greedy with the
model's own KV cache (`use_cache=True`, `past_key_values`) for a fixed number of new tokens.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.evaluate.perplexity import model_device, supports_logits_to_keep
from moepress.models.base import Adapter, get_adapter

CPU_NOTE = "CPU timings: not representative of accelerator serving speed"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class SpeedResult:
    """One model's numbers. Dict keys of the per-batch fields are batch sizes."""

    device: str
    cpu_timing: bool
    dtype: str
    experts_implementation: str | None
    param_bytes: dict[str, int]
    decode_bytes_per_token: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    peak_memory_bytes: dict[int, int | None] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedComparison:
    """Compressed / original ratios from measurements taken in one process on one device."""

    device: str
    cpu_timing: bool
    original: SpeedResult
    compressed: SpeedResult
    bytes_ratio: float  # compressed / original parameter bytes
    prefill_speedup: dict[int, float]  # compressed tokens/s ÷ original tokens/s
    decode_speedup: dict[int, float]
    peak_memory_ratio: dict[int, float | None]
    decode_bytes_limit_speedup: float  # original / compressed bytes read per decoded token (batch 1)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- bytes ------------------------------------------------------------------------------------
def component_adapter(model: nn.Module) -> Adapter:
    """The family adapter, or the generic name-based accounting for models it does not know."""
    try:
        return get_adapter(model)
    except MoepressError:  # dense model, unknown family, or every MoE layer condensed
        return Adapter()


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes per component (attention, dense_mlp, shared_experts, ...) plus 'total'."""
    from moepress.inspect import bytes_by_component

    return bytes_by_component(model, component_adapter(model))[1]


def _routing_shape(adapter: Adapter, model: nn.Module, layer: int, routed: list[torch.Tensor]):
    """(top_k, routed experts) of one MoE layer, or (None, None) when neither can be told."""
    try:
        block = adapter.block(layer, adapter.layers(model)[layer])
        return block.top_k, block.num_experts
    except (AttributeError, NotImplementedError, IndexError, TypeError):
        # a module the adapter does not read (e.g. MoNE's NoviceExperts: novice slots read no
        # weights): top_k from the config, the expert count from the stacked [E, ...] tensors
        stacked = [t.shape[0] for t in routed if t.ndim == 3]
        return getattr(model.config, "num_experts_per_tok", None), (stacked[0] if stacked else None)


def decode_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one batch-1 decode step reads: the speed limit of memory-bound decoding.

    Everything is read once except the routed experts (top_k of E per MoE layer; a condensed
    layer is a dense MLP and reads all its rows) and the input embedding (one row, unless it is
    tied to the LM head, which reads all of it).
    """
    adapter = component_adapter(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    total = 0.0
    routed: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name, p in model.named_parameters():
        m = _LAYER.search("." + name)
        if embed is not None and p is embed.weight and not tied:
            total += p.shape[-1] * p.element_size()
        elif m and adapter.component(name) == "routed_experts":
            routed[int(m.group(1))].append(p)
        else:
            total += p.numel() * p.element_size()
    for layer, tensors in routed.items():
        k, n = _routing_shape(adapter, model, layer, tensors)
        share = min(k, n) / n if k and n else 1.0
        total += share * sum(t.numel() * t.element_size() for t in tensors)
    return int(round(total))


# ---- timing -----------------------------------------------------------------------------------
def _elapsed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds `fn` takes on `device` (CUDA events on GPU, perf_counter elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _step_kwargs(model: nn.Module) -> dict:
    # generation only needs the last position's logits; asking for all would be [B, L, V] at prefill
    return {"use_cache": True, **({"logits_to_keep": 1} if supports_logits_to_keep(model) else {})}


def prefill_seconds(model: nn.Module, prompt: torch.Tensor) -> float:
    """One forward over the prompt [B, L] building the KV cache, as generation's first step does."""
    kw = _step_kwargs(model)
    return _elapsed(lambda: model(input_ids=prompt, **kw), prompt.device)


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding of `new_tokens` after the prompt with the model's KV cache; only the decode
    steps are timed."""
    kw = _step_kwargs(model)
    out = model(input_ids=prompt, **kw)
    state = {"past": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def loop() -> None:
        for _ in range(new_tokens):
            o = model(input_ids=state["next"], past_key_values=state["past"], **kw)
            state["past"], state["next"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    return _elapsed(loop, prompt.device)


def _median(fn: Callable[[], float], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(repeats))


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    prompt_len: int = 512,
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> SpeedResult:
    """Prefill and decode tokens/s and peak memory for each batch size, on the model's device."""
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or not batch_sizes:
        raise MoepressError("prompt_len, new_tokens, repeats and batch_sizes must be positive / non-empty")
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()
    cpu = device.type != "cuda"
    res = SpeedResult(
        device=str(device) if cpu else f"{device} ({torch.cuda.get_device_name(device)})",
        cpu_timing=cpu,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        experts_implementation=getattr(getattr(model, "config", None), "_experts_implementation", None),
        param_bytes=param_bytes(model),
        decode_bytes_per_token=decode_bytes_per_token(model),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        note=CPU_NOTE if cpu else "",
    )
    g = torch.Generator().manual_seed(seed)
    try:
        for b in batch_sizes:
            prompt = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
            if not cpu:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t_pre = _median(lambda p=prompt: prefill_seconds(model, p), warmup, repeats)
            t_dec = _median(lambda p=prompt: decode_seconds(model, p, new_tokens), warmup, repeats)
            res.prefill_tokens_per_s[b] = b * prompt_len / t_pre
            res.decode_tokens_per_s[b] = b * new_tokens / t_dec
            res.peak_memory_bytes[b] = None if cpu else torch.cuda.max_memory_allocated(device)
    finally:
        model.train(was_training)
    return res


def _ratios(num: dict, den: dict) -> dict:
    return {k: (num[k] / den[k] if num.get(k) and den.get(k) else None) for k in den}


def speed_ratios(original: SpeedResult, compressed: SpeedResult) -> SpeedComparison:
    """Compressed/original ratios of two results measured in one process on one device."""
    a, b = original, compressed
    if a.device != b.device:
        raise MoepressError(f"results come from {a.device} and {b.device}; compare results from one device")
    return SpeedComparison(
        device=a.device,
        cpu_timing=a.cpu_timing,
        original=a,
        compressed=b,
        bytes_ratio=b.param_bytes["total"] / a.param_bytes["total"],
        prefill_speedup=_ratios(b.prefill_tokens_per_s, a.prefill_tokens_per_s),
        decode_speedup=_ratios(b.decode_tokens_per_s, a.decode_tokens_per_s),
        peak_memory_ratio=_ratios(b.peak_memory_bytes, a.peak_memory_bytes),
        decode_bytes_limit_speedup=a.decode_bytes_per_token / b.decode_bytes_per_token,
    )


def compare_speed(original: nn.Module, compressed: nn.Module, **kwargs) -> SpeedComparison:
    """Measure both models in this process (original first) and return compressed/original ratios.

    `kwargs` go to `measure_speed`. Both models must sit on the same device.
    """
    if model_device(original) != model_device(compressed):
        raise MoepressError(
            f"models are on {model_device(original)} and {model_device(compressed)}; "
            "put both on the same device to compare their speed"
        )
    return speed_ratios(measure_speed(original, **kwargs), measure_speed(compressed, **kwargs))
