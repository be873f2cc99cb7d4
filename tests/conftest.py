"""Shared fixtures: tiny models of every family, the remote-code stand-in, the bundled checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MOEPRESS_QUIET", "1")

import torch  # noqa: E402

from moepress.plan import CompressionPlan, Condense, Drop, Prune  # noqa: E402

# one intra-op thread: CI has 2 cores and pytest-xdist-free runs are steadier and no slower this way
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
DATA = SHARED / "data"
MINI_MODELS = ("dsv2-mini", "qwen2moe-mini", "olmoe-mini")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread inside every test, whatever code before it set: tiny tensors gain nothing from
    threads, and on a shared 2-core machine OpenMP threads that wait for each other make a tiny
    forward 50× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mini_model_path(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not present (the bundled checkpoints live in ../shared/models)")
    return path


def _set_novices(plan: CompressionPlan, layer: int, experts: tuple[int, ...]) -> None:
    for e in experts:
        plan.set_novice(layer, e, torch.linspace(-1, 1, 32) * (e + 1) / 4)


def kind_plan(kind: str, moe: list[int]) -> CompressionPlan:
    """One plan per output kind over a tiny model's MoE layers (2 or 3 of them, 8 experts, top-2);
    the checkpoint and plain-loading tests share them."""
    plan = CompressionPlan(method=f"test-{kind}")
    if kind == "prune_uniform":
        plan.layers = {i: Prune(keep_experts=[0, 2, 3, 4, 6, 7]) for i in moe}
    elif kind == "prune_novices":
        plan.layers = {i: Prune(keep_experts=[1, 2, 4, 7], novices=[0, 5]) for i in moe}
        for i in moe:
            _set_novices(plan, i, (0, 5))
    elif kind == "prune_nonuniform":
        plan.layers = {moe[0]: Prune(keep_experts=[0, 1, 2, 3, 4, 5]), moe[1]: Prune(keep_experts=[1, 3, 5, 7])}
    elif kind == "condense":
        plan.layers = {moe[0]: Condense(experts=[2, 5, 6], weights=[0.5, 0.3, 0.2])}
    elif kind == "drop":
        plan.layers = {moe[-1]: Drop()}
    elif kind == "mixed":  # novices, a condensed layer and (with a third MoE layer) a dropped one
        plan.layers = {moe[0]: Prune(keep_experts=[0, 3, 4], novices=[6]), moe[1]: Condense(experts=[1], weights=[1.0])}
        _set_novices(plan, moe[0], (6,))
        if len(moe) > 2:
            plan.layers[moe[2]] = Drop()
    return plan


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


def family_case(model_type: str, *values):
    """A `parametrize` entry for a test of one family: skipped, naming the release, where the installed
    transformers predates the family (`Family.since`)."""
    from moepress.models.families import needs_newer_transformers

    reason = needs_newer_transformers(model_type)
    return pytest.param(model_type, *values, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


def needs_family(model_type: str):
    """Skip a test of one family where the installed transformers predates it, naming the release."""
    from moepress.models.families import needs_newer_transformers

    reason = needs_newer_transformers(model_type)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
