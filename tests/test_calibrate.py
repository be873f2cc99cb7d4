"""Layer-by-layer statistics equal whole-model hooked statistics; statistics round-trip and merge."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import CalibrationStats, calibrate, calibrate_hooked
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import DATA, mini_model_path

FIELDS = ("count", "weight_sum", "weighted_norm_sum", "logit_sum", "logit_sqsum", "out_mean", "out_m2")


def assert_stats_close(a: CalibrationStats, b: CalibrationStats, rtol=1e-5):
    assert a.layers.keys() == b.layers.keys()
    for i in a.layers:
        for name in FIELDS:
            x, y = getattr(a[i], name), getattr(b[i], name)
            scale = y.abs().max().clamp(min=1e-12)
            assert ((x - y).abs().max() / scale) <= rtol, (i, name)
        assert a[i].tokens == b[i].tokens


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layerwise_equals_hooked(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    layerwise = calibrate(model, ids, batch_size=2).stats
    hooked = calibrate_hooked(model, ids, batch_size=2)
    assert_stats_close(layerwise, hooked)
    for s in layerwise.layers.values():
        assert s.count.sum() == s.tokens * s.top_k
        torch.testing.assert_close(s.frequency.sum().item(), 1.0)


def test_layerwise_equals_hooked_remote_code(remote_code_model):
    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    assert_stats_close(calibrate(remote_code_model, ids).stats, calibrate_hooked(remote_code_model, ids))


def test_layerwise_equals_hooked_on_trained_checkpoint():
    from moepress.data import load_tokens
    from moepress.models.loading import load_model

    model, tok = load_model(mini_model_path("dsv2-mini"), dtype="float32")
    ids = load_tokens(tok, DATA / "calib.txt", n=4, seq_len=64).input_ids
    a = calibrate(model, ids, batch_size=2).stats
    assert_stats_close(a, calibrate_hooked(model, ids, batch_size=2))
    # trained routing is skewed: some experts are far more frequent than uniform
    freq = a[3].frequency
    uniform = 1 / freq.numel()
    assert freq.max() > 1.5 * uniform and freq.min() < 0.5 * uniform


def test_variance_and_mean_match_direct_computation():
    model = tiny_model("olmoe")
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    result = calibrate(model, ids, batch_size=1, keep_moe_inputs=10_000)
    from moepress.models import get_adapter

    block = get_adapter(model).blocks(model)[1]
    x = result.moe_inputs[1]
    assert x.shape[0] == 4 * 16
    route = block.route(x)
    s = result.stats[1]
    for e in range(block.num_experts):
        tok = (route.index == e).any(-1)
        y = block.expert(x[tok], e).double()
        if tok.sum() > 1:
            torch.testing.assert_close(s.out_mean[e], y.mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s.output_variance[e], y.var(0, unbiased=False).mean(), rtol=1e-5, atol=1e-9)


def test_stats_save_load_and_merge(tmp_path):
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(4))
    whole = calibrate(model, ids).stats
    part = calibrate(model, ids[:2]).stats
    part.merge(calibrate(model, ids[2:]).stats)
    assert_stats_close(part, whole)
    whole.save(tmp_path / "s")
    assert_stats_close(CalibrationStats.load(tmp_path / "s"), whole, rtol=0)
