"""The grouped statistics path (one sort, grouped expert GEMMs, segment sums, one vectorised Chan
merge) gives the statistics of the one-expert-at-a-time reference, in any batch split, and the
fused calibration forward gives the model's own MoE block output bit for bit."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import CalibrationStats, LayerStats, calibrate, calibrate_hooked
from moepress.calibrate.runner import forward_collecting
from moepress.calibrate.stats import route_experts
from moepress.models import get_adapter
from moepress.models.base import ExpertStore, FusedExperts, RouteResult
from moepress.testing import TINY_FAMILIES, tiny_model

from .test_calibrate import FIELDS, assert_stats_close


def _moe_inputs(family: str, n: int = 4, length: int = 24) -> tuple[torch.nn.Module, dict[int, torch.Tensor]]:
    """A tiny model and the real hidden states entering each of its MoE blocks."""
    model = tiny_model(family)
    ids = torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(7))
    return model, calibrate(model, ids, batch_size=2, keep_moe_inputs=n * length).moe_inputs


def _stats(block, batches: list[torch.Tensor], grouped: bool) -> LayerStats:
    s = LayerStats(block.layer_idx, block.num_experts, block.hidden_size, block.top_k)
    for x in batches:
        (s.update if grouped else s.update_per_expert)(block, x)
    return s


def assert_layer_stats_close(a: LayerStats, b: LayerStats, rtol: float) -> None:
    assert a.tokens == b.tokens
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        scale = y.abs().max().clamp(min=1e-12)
        assert (x - y).abs().max() / scale <= rtol, (name, ((x - y).abs().max() / scale).item())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_grouped_equals_per_expert_reference(family):
    model, inputs = _moe_inputs(family)
    for i, block in get_adapter(model).blocks(model).items():
        batches = list(inputs[i].split(32))
        grouped, reference = _stats(block, batches, True), _stats(block, batches, False)
        assert_layer_stats_close(grouped, reference, rtol=1e-12)
        assert torch.equal(grouped.count, reference.count)
        assert (grouped.count == 0).any() or grouped.count.min() > 0  # both kinds of expert are handled


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "olmoe"])
def test_grouped_is_independent_of_the_batch_split(family):
    model, inputs = _moe_inputs(family)
    # float64 experts and one routing of all tokens: a GEMM's rounding may depend on its row count
    # (and routers stay float32), the statistics' accumulation must not
    model.double()
    block = get_adapter(model).blocks(model)[min(inputs)]
    x = inputs[min(inputs)].double()
    route = block.route(x)

    def add(s: LayerStats, rows: slice) -> LayerStats:
        part = RouteResult(route.logits[rows], route.scores[rows], route.weights[rows], route.index[rows])
        s.update(block, x[rows], part)
        return s

    def empty() -> LayerStats:
        return LayerStats(block.layer_idx, block.num_experts, block.hidden_size, block.top_k)

    whole = add(empty(), slice(None))
    uneven = empty()
    for rows in (slice(0, 5), slice(5, 6), slice(6, 46), slice(46, None)):
        add(uneven, rows)
    assert_layer_stats_close(uneven, whole, rtol=1e-12)
    shards = [add(empty(), rows) for rows in (slice(0, 33), slice(33, 66), slice(66, None))]
    for shard in reversed(shards[1:]):  # merged out of order
        shards[0].merge(shard)
    assert_layer_stats_close(shards[0], whole, rtol=1e-12)


def test_experts_never_routed_to_stay_zero():
    model, inputs = _moe_inputs("mixtral")
    block = get_adapter(model).blocks(model)[0]
    x = inputs[0][:1]  # one token: only top_k experts are used
    s = _stats(block, [x], True)
    unused = s.count == 0
    assert unused.sum() == block.num_experts - block.top_k
    for name in ("weight_sum", "weighted_norm_sum", "out_mean", "out_m2"):
        assert not getattr(s, name)[unused].any(), name


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_is_the_model_block_bit_for_bit(family, dtype):
    model = tiny_model(family).to(dtype)
    for i, block in get_adapter(model).blocks(model).items():
        x = torch.randn(3, 20, block.hidden_size, generator=torch.Generator().manual_seed(i), dtype=dtype)
        s = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
        with torch.no_grad():
            ours, theirs = forward_collecting(block, s, x), block.module(x)
        if type(block.experts) is FusedExperts:  # the same op sequence as transformers' grouped_mm path
            assert torch.equal(ours, theirs)
        else:
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        assert s.tokens == 60 and s.count.sum() == 60 * block.top_k


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe"])
def test_bf16_statistics_match_the_float64_reference(family):
    model = tiny_model(family).to(torch.bfloat16)
    block = next(iter(get_adapter(model).blocks(model).values()))
    x = torch.randn(200, block.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert_layer_stats_close(_stats(block, [x], True), _stats(block, [x], False), rtol=1e-5)


def test_default_grouped_forward_equals_the_fused_override():
    model = tiny_model("qwen3_moe")
    store = get_adapter(model).blocks(model)[1].experts
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 7, 2])
    x = torch.randn(int(counts.sum()), 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast, generic = store.grouped_forward(x, counts), ExpertStore.grouped_forward(store, x, counts)
    torch.testing.assert_close(fast, generic, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_calibration_paths_agree(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    fused = calibrate(model, ids, batch_size=2).stats
    for path in ("hooked", "per_expert"):
        assert_stats_close(calibrate(model, ids, batch_size=2, stats_path=path).stats, fused, rtol=1e-10)
    # the model's forward is its own again afterwards
    assert all("forward" not in vars(b.module) for b in get_adapter(model).blocks(model).values())


def test_fused_calibration_of_remote_code_experts(remote_code_model):
    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    fused: CalibrationStats = calibrate(remote_code_model, ids).stats
    assert_stats_close(fused, calibrate_hooked(remote_code_model, ids))
    assert_stats_close(fused, calibrate(remote_code_model, ids, stats_path="per_expert").stats, rtol=1e-10)


def test_a_block_the_view_does_not_reproduce_keeps_its_own_forward():
    model = tiny_model("qwen3_moe")
    blocks = get_adapter(model).blocks(model)
    assert len(blocks) > 1
    for block in blocks.values():  # the model's experts now differ from what its MoEBlock view computes
        experts = block.module.experts
        experts.forward = lambda *args, own=experts.forward: 2 * own(*args)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(8))
    assert_stats_close(calibrate(model, ids, batch_size=2).stats, calibrate_hooked(model, ids, batch_size=2))


_KERNEL_CHECK = """
import torch
from moepress.calibrate.segment_moments import segment_moments, segment_moments_reference, use_kernel
g = torch.Generator().manual_seed(0)
counts = torch.tensor([0, 37, 1, 0, 70, 5, 64, 0])
device = "cuda" if torch.cuda.is_available() else "cpu"
for dtype in (torch.bfloat16, torch.float16):
    values = (3 + torch.randn(int(counts.sum()), 72, generator=g)).to(dtype).to(device)
    shift = torch.randn(8, 72, generator=g).to(device)
    assert use_kernel(values)
    got = segment_moments(values, counts.to(device), shift)
    want = segment_moments_reference(values, counts.to(device), shift)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert not got[0][counts == 0].any() and got[1].abs().max() > 1
print("kernel ok")
"""


def test_segment_moments_kernel_equals_the_torch_reference():
    """The Triton kernel (on a GPU, or Triton's CPU interpreter) gives the torch computation's sums."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton ships with CUDA builds of PyTorch; this CPU build has none")
    env = dict(os.environ) if torch.cuda.is_available() else {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "kernel ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("family", ["deepseek_v2", "olmoe"])
@torch.no_grad()
def test_half_precision_moments_are_shifted_without_cancellation(family):
    """bf16 expert outputs with a mean far larger than their spread: the shifted float32 moments
    still give the float64 variance (Σy² − nȳ² in float32 would lose it)."""
    model = tiny_model(family).to(torch.bfloat16)
    block = next(iter(get_adapter(model).blocks(model).values()))
    x = torch.randn(300, block.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    route = block.route(x)

    def stats(dtype: torch.dtype) -> LayerStats:
        s = LayerStats(block.layer_idx, block.num_experts, block.hidden_size, block.top_k)
        for rows in (slice(0, 100), slice(100, None)):  # the second batch is shifted by the running mean
            part = RouteResult(route.logits[rows], route.scores[rows], route.weights[rows], route.index[rows])
            routes = route_experts(block, x[rows], part)
            routes.outputs = (routes.outputs.float() + 16).bfloat16().to(dtype)  # mean far above the spread
            s.add_routes(part, routes)
        return s

    fast, exact = stats(torch.bfloat16), stats(torch.float64)
    assert_layer_stats_close(fast, exact, rtol=1e-5)
    var = exact.out_m2 / exact.count.clamp(min=1)[:, None]
    assert ((fast.out_m2 - exact.out_m2).abs().max() / exact.out_m2.abs().max()) < 1e-4 and var.max() > 1e-6
