"""Memory and speed of a model as it runs: parameter bytes by component, bytes read per decoded
token, peak accelerator memory, prefill and decode tokens/s, and original-vs-compressed ratios.

Timing: warm-up runs first, then the median of `repeats` runs, timed with CUDA events on a GPU
and `time.perf_counter` on CPU. CPU numbers say little about GPU serving speed; every result
carries its device and `cpu_timing` so nobody quotes them as such. Decoding is greedy with the
model's own KV cache (`use_cache=True`, `past_key_values`) for a fixed number of new tokens.

Compiled decoding (`compile_mode`): a static KV cache (`transformers.StaticCache`, allocated once for
prompt + new tokens) and `torch.compile` of the model's forward for the one-token steps ("reduce-overhead":
inductor kernels replayed as CUDA graphs; the prefill stays eager). transformers' grouped-GEMM experts
(`grouped_mm`, the default) sort and count tokens per expert with fixed-shape ops, so a whole MoE step is
one graph; condensed layers are dense MLPs. Greedy tokens equal the eager loop's.

Bytes-read limit: a decode step of b sequences must read every weight it uses once (routed experts: the
expected share hit by at least one of the b·k picks, uniform routing) plus the static KV cache;
`bytes_limit_fraction` = measured steps/s × bytes per step ÷ `bandwidth` (default: H200 HBM, 4.8e12 B/s).
1.0 is the memory-bound ceiling; on a CPU the fraction means nothing (`cpu_timing`).
"""

from __future__ import annotations

import inspect
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
H200_BANDWIDTH = 4.8e12  # bytes/s of HBM3e, the default of the bytes-read limit
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
    # bytes one decode step of b sequences reads (weights it uses + the static KV cache) and the share of
    # the bandwidth limit the measured steps reach; compiled_* only with `compile_mode`
    bandwidth_bytes_per_s: float = H200_BANDWIDTH
    decode_bytes_per_step: dict[int, int] = field(default_factory=dict)
    bytes_limit_fraction: dict[int, float] = field(default_factory=dict)
    compile_mode: str | None = None
    compiled_decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    compiled_bytes_limit_fraction: dict[int, float] = field(default_factory=dict)
    compile_seconds: dict[int, float] = field(default_factory=dict)  # first (compiling) run of b
    # seconds of each timed decode run (the medians above come from these), for spreads
    decode_runs_s: dict[int, list[float]] = field(default_factory=dict)
    compiled_decode_runs_s: dict[int, list[float]] = field(default_factory=dict)

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
    compiled_decode_speedup: dict[int, float]
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
    return decode_bytes_per_step(model, 1)


def decode_bytes_per_step(model: nn.Module, batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads: `decode_bytes_per_token`'s count with
    `batch` embedding rows and, per MoE layer, the expected share of routed experts that at least one
    of the batch·top_k picks hits under uniform routing, 1 − (1 − k/E)^batch (k/E at batch 1)."""
    adapter = component_adapter(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    total = 0.0
    routed: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name, p in model.named_parameters():
        m = _LAYER.search("." + name)
        if embed is not None and p is embed.weight and not tied:
            total += min(batch, p.shape[0]) * p.shape[-1] * p.element_size()
        elif m and adapter.component(name) == "routed_experts":
            routed[int(m.group(1))].append(p)
        else:
            total += p.numel() * p.element_size()
    for layer, tensors in routed.items():
        k, n = _routing_shape(adapter, model, layer, tensors)
        share = (min(k, n) / n if batch == 1 else 1 - (1 - min(k, n) / n) ** batch) if k and n else 1.0
        total += share * sum(t.numel() * t.element_size() for t in tensors)
    return int(round(total))


def cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a (static) KV cache holds: what each compiled step's attention reads."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


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


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int, record: dict | None = None) -> float:
    """Greedy decoding of `new_tokens` after the prompt with the model's KV cache; only the decode
    steps are timed. `record["cache_bytes"]` gets the KV cache's size at the end."""
    kw = _step_kwargs(model)
    cache_keyword = _cache_keyword(model)
    out = model(input_ids=prompt, **kw)
    state = {"past": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def loop() -> None:
        for _ in range(new_tokens):
            o = model(input_ids=state["next"], **{cache_keyword: state["past"]}, **kw)
            state["past"], state["next"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    seconds = _elapsed(loop, prompt.device)
    if record is not None:
        record["cache_bytes"] = cache_bytes(state["past"])
    return seconds


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def compile_step(model: nn.Module, mode: str = "reduce-overhead", backend: str = "inductor") -> Callable:
    """`torch.compile` of the model's forward for one-token steps on a static cache: one graph per batch
    size (`dynamic=False`). `backend="eager"` only traces (fast; tests), "inductor" generates kernels."""
    return torch.compile(model.forward, mode=mode if backend == "inductor" else None, backend=backend,
                         dynamic=False)


def static_decode(model: nn.Module, step: Callable, prompt: torch.Tensor, new_tokens: int,
                  cache) -> tuple[float, torch.Tensor]:
    """Greedy decoding of `new_tokens` after an eager prefill into `cache` (a StaticCache, reset here),
    each step through `step` (`compile_step`); returns (seconds of the decode steps, the greedy tokens
    [B, 1 + new_tokens]: the prefill's, then each step's)."""
    b, length = prompt.shape
    key = _cache_keyword(model)
    cache.reset()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache})
    positions = torch.arange(length, length + new_tokens, device=prompt.device).view(-1, 1, 1).expand(-1, b, 1)
    state = {"next": out.logits[:, -1].argmax(-1, keepdim=True)}
    state["tokens"] = [state["next"]]

    def loop() -> None:
        for t in range(new_tokens):
            # CUDA graphs reuse their output buffers: only what is read before the next replay is valid
            torch.compiler.cudagraph_mark_step_begin()
            o = step(input_ids=state["next"], position_ids=positions[t].contiguous(), use_cache=True,
                     logits_to_keep=1, **{key: cache})
            state["next"] = o.logits[:, -1].argmax(-1, keepdim=True)
            state["tokens"].append(state["next"])

    seconds = _elapsed(loop, prompt.device)
    return seconds, torch.cat(state["tokens"], dim=1)


def _median(fn: Callable[[], float], warmup: int, repeats: int, runs: list[float] | None = None) -> float:
    for _ in range(warmup):
        fn()
    timed = [fn() for _ in range(repeats)]
    if runs is not None:
        runs.extend(timed)
    return statistics.median(timed)


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
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    bandwidth: float = H200_BANDWIDTH,
) -> SpeedResult:
    """Prefill and decode tokens/s and peak memory for each batch size, on the model's device; with
    `compile_mode` (e.g. "reduce-overhead") also compiled static-cache decoding (`static_decode`).
    `bandwidth` (bytes/s) sets the bytes-read limit the decode speeds are compared with."""
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or not batch_sizes:
        raise MoepressError("prompt_len, new_tokens, repeats and batch_sizes must be positive / non-empty")
    if bandwidth <= 0:
        raise MoepressError(f"bandwidth is in bytes/s and must be positive (got {bandwidth})")
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
        bandwidth_bytes_per_s=float(bandwidth),
        compile_mode=compile_mode,
    )
    g = torch.Generator().manual_seed(seed)
    step = compile_step(model, compile_mode, compile_backend) if compile_mode else None
    try:
        for b in batch_sizes:
            prompt = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
            if not cpu:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            record: dict = {}
            t_pre = _median(lambda p=prompt: prefill_seconds(model, p), warmup, repeats)
            t_dec = _median(lambda p=prompt, r=record: decode_seconds(model, p, new_tokens, r), warmup, repeats,
                            res.decode_runs_s.setdefault(b, []))
            res.prefill_tokens_per_s[b] = b * prompt_len / t_pre
            res.decode_tokens_per_s[b] = b * new_tokens / t_dec
            res.peak_memory_bytes[b] = None if cpu else torch.cuda.max_memory_allocated(device)
            per_step = res.decode_bytes_per_step[b] = decode_bytes_per_step(model, b) + record.get("cache_bytes", 0)
            res.bytes_limit_fraction[b] = per_step * new_tokens / t_dec / bandwidth  # bytes/s ÷ bandwidth
            if step is not None:
                t_compiled, first = _compiled_decode(model, step, prompt, new_tokens, warmup, repeats,
                                                     res.compiled_decode_runs_s.setdefault(b, []))
                res.compile_seconds[b] = first
                res.compiled_decode_tokens_per_s[b] = b * new_tokens / t_compiled
                res.compiled_bytes_limit_fraction[b] = per_step * new_tokens / t_compiled / bandwidth
    finally:
        model.train(was_training)
    return res


def _compiled_decode(model: nn.Module, step: Callable, prompt: torch.Tensor, new_tokens: int, warmup: int,
                     repeats: int, runs: list[float]) -> tuple[float, float]:
    """(median seconds of the compiled decode steps, seconds of the first run, which compiles)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    t0 = time.perf_counter()
    static_decode(model, step, prompt, new_tokens, cache)
    first = time.perf_counter() - t0
    seconds = _median(lambda: static_decode(model, step, prompt, new_tokens, cache)[0], max(warmup, 1), repeats,
                      runs)
    return seconds, first


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
        compiled_decode_speedup=_ratios(b.compiled_decode_tokens_per_s, a.compiled_decode_tokens_per_s),
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
