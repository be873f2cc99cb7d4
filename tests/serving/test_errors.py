"""Checkpoints the plugin cannot serve fail with one clear line, before weights load (or at load for a
missing tensor); other vLLM versions refuse moepress checkpoints but still serve every other model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moepress.errors import MoepressError
from tests.serving.helpers import prompt_ids, transformers_greedy, vllm_greedy, write_native

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
QWEN = MODELS / "qwen2moe-mini"


def _plans(**config):
    from moepress.serving.machinery import layer_plans

    return layer_plans(SimpleNamespace(num_experts=8, **config), "num_experts", native_on_old_vllm=True)


def test_approximate_expert_out_of_range():
    with pytest.raises(MoepressError, match=r"layer 1 names experts \[3, 8\]: outside \[0, 8\)"):
        _plans(approximate_experts={"1": [3, 8]})


def test_approximate_experts_replacing_every_expert():
    with pytest.raises(MoepressError, match="keep at least one"):
        _plans(approximate_experts={"0": list(range(8))})


def test_layer_kind_the_plugin_does_not_serve():
    structure = {"layers": {"2": {"action": "condense", "form": "experts", "experts": 2}}}
    with pytest.raises(MoepressError, match="layer 2: the moepress vLLM plugin does not serve this layer kind"):
        _plans(moepress_structure=structure)


def test_other_vllm_version_is_one_error(monkeypatch):
    from moepress.serving import versions

    monkeypatch.setattr(versions, "vllm_release", lambda: "0.29")
    with pytest.raises(
        MoepressError, match=r"moepress serves moepress checkpoints on vLLM 0\.32\.x.*installed vLLM is 0\.29"
    ):
        versions.check_vllm_version("moepress")


@pytest.fixture
def vllm_029(monkeypatch):
    """The plugin believes vLLM is 0.29, a release it does not know."""
    from moepress.serving import versions

    monkeypatch.setattr(versions, "vllm_release", lambda: "0.29")


def test_other_vllm_version_at_load_and_stock_models_unharmed(vllm_029, tmp_path):
    if not (QWEN / "config.json").is_file():
        pytest.skip(f"{QWEN} not present")
    native = write_native(QWEN, tmp_path / "native")
    with pytest.raises(Exception, match="moepress serves approximate_experts checkpoints on vLLM 0.32.x"):
        vllm_greedy(native, [[1, 2, 3]])
    prompts = prompt_ids(QWEN)
    assert vllm_greedy(QWEN, prompts) == transformers_greedy(QWEN, prompts)


def test_missing_approx_value_at_load(tmp_path):
    if not (QWEN / "config.json").is_file():
        pytest.skip(f"{QWEN} not present")
    broken = write_native(QWEN, tmp_path / "broken", drop_value=True)
    with pytest.raises(Exception, match=r"layer \d+: the checkpoint has no approx_value for novice experts \[\d+\]"):
        vllm_greedy(broken, [[1, 2, 3]])
