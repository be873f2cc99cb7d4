"""Every moepress output kind of the bundled Qwen2-MoE and OLMoE minis, and of tiny random Qwen3-MoE, Mixtral,
DeepSeek-V2 and DeepSeek-V3 models: vLLM's greedy tokens (float32, CPU) equal `moepress.load`'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serving.helpers import (
    CALIB,
    assert_same_greedy,
    prompt_ids,
    transformers_greedy,
    vllm_greedy,
    write_layer_counts,
    write_native,
    write_tiny,
)

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
DATA = MODELS.parent / "data" / "calib.txt"
MINIS = ("qwen2moe-mini", "olmoe-mini")
# random models at sizes vLLM's CPU attention takes
_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, head_dim=64)  # CPU MLA: 576


def _yarn(mscale: float) -> dict:
    """The released DeepSeek configs' rope: yarn, factor 40 over 4k positions. vLLM runs it through
    DeepseekScalingRotaryEmbedding's PyTorch path; unscaled rope would take vLLM 0.32's CPU rotary op, which
    rotates MLA's 3-D query and key wrong (test_vllm_cpu_rope.py)."""
    return dict(max_position_embeddings=163840, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
        beta_slow=1, mscale=mscale, mscale_all_dim=mscale))


TINY = {
    "qwen3_moe": {},
    "mixtral": {},
    # DeepSeek-V2-Lite's routing fields (vLLM's CPU router asks for the groups even when greedy) and rope
    "deepseek_v2": dict(_MLA, **_yarn(0.707), q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy"),
    # DeepSeek-V3's released config names its routing; transformers' class leaves both out, vLLM reads them
    "deepseek_v3": dict(_MLA, **_yarn(1.0), topk_method="noaux_tc", scoring_func="sigmoid"),
}

# kind -> how to make it from a source folder
KINDS = {
    "uniform-prune": lambda src, out: _compress(src, "frequency", out, ratio=0.25),
    "merge": lambda src, out: _compress(src, "hc-smoe", out, ratio=0.25, hp={"router": "representative"}),
    # every router row kept, each routing to its merged expert (hc-smoe's default): moepress's own format
    "merge-all-rows": lambda src, out: _compress(src, "m-smoe", out, ratio=0.75),  # many rows per merged expert
    "mone": lambda src, out: _compress(src, "mone", out, ratio=0.25),
    "mone-native": lambda src, out: write_native(src, out),
    "zero-novice": lambda src, out: _compress(src, "mone-zero-novice", out, ratio=0.25),
    "layer-counts": write_layer_counts,
    "layer-counts-novices": lambda src, out: write_layer_counts(src, out, novices=True),
    "cd-moe-s": lambda src, out: _compress(src, "cd-moe-s", out, layers=2),
    "cd-moe-sr": lambda src, out: _compress(src, "cd-moe-sr", out, layers=2),
    "layer-drop": lambda src, out: _compress(src, "layer-drop", out, layers=2),
}


def _compress(source: Path, method: str, out: Path, **kwargs) -> Path:
    import moepress

    return Path(moepress.compress(source, method, out, data=DATA, **CALIB, **kwargs))


@pytest.fixture(scope="session")
def outputs(tmp_path_factory):
    """Compressed checkpoints, made on first use and kept for the session."""
    root = tmp_path_factory.mktemp("serving")
    made: dict[tuple[str, str], Path] = {}

    def source(model: str) -> Path:
        tokenizer = MODELS / "qwen2moe-mini"
        if not (tokenizer / "config.json").is_file():
            pytest.skip(f"{tokenizer} not present")
        if model in MINIS:
            return MODELS / model
        if model not in made:
            made[model] = write_tiny(model, root / model, tokenizer_from=tokenizer, **TINY[model])
        return made[model]

    def get(model: str, kind: str) -> Path:
        if (model, kind) not in made:
            made[model, kind] = KINDS[kind](source(model), root / f"{model}-{kind}")
        return made[model, kind]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model", MINIS + tuple(TINY))
def test_vllm_greedy_equals_transformers(outputs, model: str, kind: str):
    folder = outputs(model, kind)
    prompts = prompt_ids(folder)
    assert_same_greedy(folder, prompts, vllm_greedy(folder, prompts), transformers_greedy(folder, prompts))


def test_plain_source_is_served_as_stock(outputs):
    """The source architecture the plugin takes over (on vLLM without expert substitution) is stock vLLM
    for a checkpoint without approximate_experts."""
    folder = MODELS / "qwen2moe-mini"
    prompts = prompt_ids(folder)
    assert vllm_greedy(folder, prompts) == transformers_greedy(folder, prompts)
    assert "approximate_experts" not in json.loads((folder / "config.json").read_text())
