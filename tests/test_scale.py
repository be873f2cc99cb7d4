"""Streaming, multi-process and resumed calibration give the same statistics as the plain run."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from moepress.calibrate import CalibrationStats, calibrate
from moepress.calibrate.resume import calibrate_resumable, partial_dir
from moepress.calibrate.streaming import calibrate_streaming
from moepress.testing import tiny_model

from .test_calibrate import assert_stats_close


def _ids(seed=0, n=6, length=16):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_streaming_equals_in_memory(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)  # per-expert tensors on disk, as published checkpoints
    ids = _ids()
    streamed = calibrate_streaming(tmp_path, ids, batch_size=4).stats
    assert_stats_close(streamed, calibrate(model, ids, batch_size=4).stats, rtol=1e-6)


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
