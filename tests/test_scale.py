"""Streaming, multi-process and resumed calibration give the same statistics as the plain run."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from moepress.calibrate import CalibrationStats, calibrate
from moepress.calibrate.resume import calibrate_resumable, partial_dir
from moepress.calibrate.streaming import calibrate_streaming, skeleton
from moepress.errors import MoepressError
from moepress.testing import TINY_FAMILIES, declared_families, tiny_model

from .test_calibrate import assert_stats_close


def _ids(seed=0, n=6, length=16):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# gemma4_text: non-persistent buffers (embedding scales, per-layer-type rotary tables) and a tied head, in no
# checkpoint; minimax, phimoe, lfm2_moe, nemotron_h: per-expert tensors under names that transformers' weight
# conversion maps (w1/w3/w2, `block_sparse_moe`, a `backbone.` prefix)
@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral", "gemma4_text", "minimax", "phimoe",
                                    "lfm2_moe", "nemotron_h", "minimax_m2"])
def test_streaming_equals_in_memory(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)  # per-expert tensors on disk, as published checkpoints
    ids = _ids()
    streamed = calibrate_streaming(tmp_path, ids, batch_size=4).stats
    assert_stats_close(streamed, calibrate(model, ids, batch_size=4).stats, rtol=1e-6)


@pytest.mark.parametrize("family", [*TINY_FAMILIES, *declared_families()])
def test_streamed_skeleton_buffers_are_the_models_own(tmp_path, family):
    """Every non-persistent buffer (in no checkpoint) is what the model's own init computes, and the
    skeleton holds no memory."""
    model = tiny_model(family)
    model.config.save_pretrained(tmp_path)
    built = skeleton(tmp_path, torch.float32)
    assert all(t.is_meta for t in [*built.model.parameters(), *built.model.buffers()])
    for name, buf in model.named_buffers():
        if name not in model.state_dict():
            want = built.buffers[name]
            assert want.dtype == buf.dtype and torch.equal(want, buf), name


def test_a_buffer_derived_from_the_weights_is_refused(tmp_path, monkeypatch):
    from transformers.models.olmoe import modeling_olmoe

    tiny_model("olmoe").config.save_pretrained(tmp_path)
    init = modeling_olmoe.OlmoeRMSNorm.__init__

    def derived(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("weight_sum", self.weight.sum(), persistent=False)

    monkeypatch.setattr(modeling_olmoe.OlmoeRMSNorm, "__init__", derived)
    with pytest.raises(MoepressError, match="weight_sum.*derives from the weights"):
        skeleton(tmp_path, torch.float32)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from moepress.calibrate import distributed

    distributed.init_if_needed()
    model = tiny_model("olmoe")
    ids = distributed.shard(_ids(n=8), rank, world)
    merged = distributed.all_merge(calibrate(model, ids, batch_size=2).stats)
    merged.save(f"{out}/rank{rank}")
    # streamed: each rank reads half of every layer's tensors from disk and broadcasts them
    streamed = distributed.all_merge(calibrate_streaming(f"{out}/model", ids, batch_size=2).stats)
    streamed.save(f"{out}/stream{rank}")
    dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny_model("olmoe").save_pretrained(tmp_path / "model")
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = calibrate(tiny_model("olmoe"), _ids(n=8), batch_size=2).stats
    for rank in (0, 1):
        assert_stats_close(CalibrationStats.load(tmp_path / f"rank{rank}"), single, rtol=1e-6)
        assert_stats_close(CalibrationStats.load(tmp_path / f"stream{rank}"), single, rtol=1e-6)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    model = tiny_model("qwen2_moe")
    ids = _ids()
    out = tmp_path / "stats"

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated interruption")

    handle = model.model.layers[2].register_forward_pre_hook(crash)
    with pytest.raises(RuntimeError, match="simulated"):
        calibrate_resumable(model, ids, out, "fp", batch_size=4)
    handle.remove()
    assert (partial_dir(out) / "layer_1").is_dir() and not (partial_dir(out) / "layer_2").exists()

    calls = []
    first = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    resumed = calibrate_resumable(model, ids, out, "fp", resume=True, batch_size=4).stats
    first.remove()
    assert calls == []  # layers 0 and 1 were not run again
    assert_stats_close(resumed, calibrate(model, ids, batch_size=4).stats, rtol=1e-6)
