"""Shared fixtures: tiny models of every family, the remote-code stand-in, the bundled checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MOEPRESS_QUIET", "1")

import torch  # noqa: E402

# one intra-op thread: CI has 2 cores and pytest-xdist-free runs are steadier and no slower this way
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
DATA = SHARED / "data"
MINI_MODELS = ("dsv2-mini", "qwen2moe-mini", "olmoe-mini")


def mini_model_path(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not present (the bundled checkpoints live in ../shared/models)")
    return path


@pytest.fixture(scope="session")
def remote_code_dir(tmp_path_factory) -> Path:
    """A tiny DeepSeekMoE-16B style remote-code checkpoint (ModuleList experts)."""
    from moepress.testing import write_remote_code_model

    out = tmp_path_factory.mktemp("remote_deepseek_moe")
    write_remote_code_model(out, FIXTURES / "remote_deepseek_moe")
    return out


@pytest.fixture(scope="session")
def remote_code_model(remote_code_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(remote_code_dir, trust_remote_code=True).eval()
