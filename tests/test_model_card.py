"""Every output folder carries a Hugging Face model card (`README.md`): YAML head, method, sizes from the
manifest, format, load/serve snippets, and the evaluation table once `moepress eval` has run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import moepress
from moepress.evaluate.output import evaluate_output
from moepress.io.manifest import MANIFEST_FILE, Manifest
from moepress.io.model_card import (
    CARD_FILE,
    EVAL_END,
    EVAL_START,
    base_model_id,
    output_format,
    remote_base,
    with_eval,
)

from .conftest import DATA, mini_model_path


def head_and_body(folder: Path) -> tuple[dict, str]:
    text = (folder / CARD_FILE).read_text()
    assert text.startswith("---\n")
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    """`moepress.compress` of the Qwen2-MoE mini checkpoint with MoNE (novices: moepress modules)."""
    work = tmp_path_factory.mktemp("card")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPRESS_CACHE", str(work / "cache"))
    try:
        out = moepress.compress(
            mini_model_path("qwen2moe-mini"),
            "mone",
            work / "out",
            data=str(DATA / "calib.txt"),
            ratio=0.25,
            n=4,
            seq_len=32,
            overwrite=True,
        )
    finally:
        mp.undo()
    return Path(out)


def test_compressed_folder_has_a_card(compressed):
    head, body = head_and_body(compressed)
    assert head["base_model"] == "qwen2moe-mini"
    assert head["library_name"] == "moepress"
    assert head["pipeline_tag"] == "text-generation"
    assert {"moe", "compressed", "moepress", "mone"} <= set(head["tags"])
    manifest = Manifest.model_validate_json((compressed / MANIFEST_FILE).read_text())
    for counts in (manifest.bytes_before, manifest.bytes_after, manifest.params_before, manifest.params_after):
        assert f"{counts['total']:,}" in body
    total_row = next(line for line in body.splitlines() if line.startswith("| **total** |"))
    assert [c.strip() for c in total_row.strip("|").split("|")][1:5] == [
        f"{manifest.params_before['total']:,}",
        f"{manifest.params_after['total']:,}",
        f"{manifest.bytes_before['total']:,}",
        f"{manifest.bytes_after['total']:,}",
    ]
    assert "ratio: 0.25" in body
    fmt = output_format(json.loads((compressed / "config.json").read_text()))
    assert fmt in ("moepress", "approximate_experts")  # novices: moepress's modules or vLLM's native format
    assert f"Format: `{fmt}`" in body
    assert 'moepress.load("MODEL_DIR")' in body and "trust_remote_code=True" in body
    assert "vLLM plugin" in body
    assert EVAL_START in body and "Not evaluated yet" in body


def test_eval_writes_the_table_and_keeps_the_card(compressed, tmp_path):
    ppl = tmp_path / "dev.txt"
    ppl.write_text((DATA / "dev.txt").read_text()[:3000])
    card = compressed / CARD_FILE
    card.write_text(card.read_text().replace("## Size", "A note the user added.\n\n## Size"))
    before = card.read_text()
    for _ in range(2):  # a second run replaces the section, it does not add one
        result, written = evaluate_output(
            compressed, ppl=ppl, max_tokens=64, batch_size=2, device="cpu", trust_remote_code=True
        )
        assert written is not None
    text = card.read_text()
    assert text.count(EVAL_START) == 1 and text.count(EVAL_END) == 1
    assert "Not evaluated yet" not in text
    ppl_row = next(line for line in text.splitlines() if line.startswith("| perplexity |"))
    row = next(r for r in result["rows"] if r["metric"] == "perplexity")
    assert f"{row['compressed']:.4g}" in ppl_row
    assert text[: text.index(EVAL_START)] == before[: before.index(EVAL_START)]  # the rest is kept
    assert "A note the user added." in text
    head, _ = head_and_body(compressed)
    assert head["library_name"] == "moepress"


def test_streamed_writer_writes_a_card(tmp_path):
    from moepress.io.stream_save import save_compressed_streaming
    from moepress.plan import CompressionPlan, Prune

    src = mini_model_path("dsv2-mini")
    config = json.loads((src / "config.json").read_text())
    e = config["n_routed_experts"]
    first = config.get("first_k_dense_replace", 0)
    keep = list(range(e - 2))  # uniform pruning: the plain source architecture
    plan = CompressionPlan(
        method="frequency",
        hyperparameters={"ratio": 2 / e},
        layers={i: Prune(keep_experts=keep) for i in range(first, config["num_hidden_layers"])},
    )
    out = save_compressed_streaming(src, plan, tmp_path / "stream", dtype=torch.bfloat16)
    head, body = head_and_body(out)
    assert head["base_model"] == "dsv2-mini" and "frequency" in head["tags"]
    manifest = Manifest.model_validate_json((out / MANIFEST_FILE).read_text())
    assert f"{manifest.bytes_after['total']:,}" in body
    assert "Format: `plain`" in body
    assert 'AutoModelForCausalLM.from_pretrained("MODEL_DIR")' in body and "vllm serve MODEL_DIR\n" in body


def test_format_and_base_model_from_config(tmp_path):
    assert output_format({"model_type": "qwen2_moe"}) == "plain"
    assert output_format({"approximate_experts": {}}) == "approximate_experts"
    assert output_format({"moepress_structure": {"base": {"module": "transformers"}}}) == "moepress"
    assert not remote_base({"moepress_structure": {"base": {"module": "transformers"}}, "auto_map": {}})
    assert remote_base({"moepress_structure": {"base": {"module": ".modeling_deepseek"}}, "auto_map": {}})
    assert remote_base({"auto_map": {"AutoModelForCausalLM": "modeling_deepseek.X"}})
    assert base_model_id("Qwen/Qwen1.5-MoE-A2.7B") == "Qwen/Qwen1.5-MoE-A2.7B"
    snapshot = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V2-Lite" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert base_model_id(str(snapshot)) == "deepseek-ai/DeepSeek-V2-Lite"
    local = tmp_path / "my-model"
    local.mkdir()
    assert base_model_id(str(local)) == "my-model"
    assert base_model_id(str(local), {"_name_or_path": "allenai/OLMoE-1B-7B-0924"}) == "allenai/OLMoE-1B-7B-0924"
    assert base_model_id(None) is None


def test_with_eval_appends_to_a_card_without_a_section():
    card = with_eval(
        "---\nlibrary_name: moepress\n---\n\n# mine\n",
        {"rows": [{"metric": "perplexity", "original": 10.0, "compressed": 11.0, "retained_pct": 90.9, "unit": ""}]},
    )
    assert card.startswith("---\nlibrary_name: moepress\n---\n\n# mine\n")
    assert "| perplexity | 10 | 11 | 90.9% |" in card
