"""Every MoE family of the installed transformers has an adapter that reproduces its own block, and
every output kind (pruned, novices, condensed, dropped, mixed) of every family round-trips through a
written checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moepress
from moepress.errors import MoepressError
from moepress.io import save_compressed
from moepress.models import get_adapter
from moepress.models.families import NO_ADAPTER_YET, supported_model_types, transformers_moe_model_types
from moepress.surgery import apply_plan
from moepress.testing import declared_families, tiny_model

from .conftest import kind_plan

KINDS = ("prune_uniform", "prune_novices", "condense", "drop", "mixed")


def test_every_transformers_moe_family_has_an_adapter():
    from moepress.models.families import NEEDS_NEWER_TRANSFORMERS

    derived = set(transformers_moe_model_types())
    supported = supported_model_types() & derived
    # model types this transformers has, whose adapter reads classes of a later release (Family.since)
    later = set(NEEDS_NEWER_TRANSFORMERS) & derived
    missing = derived - supported - set(NO_ADAPTER_YET) - later
    assert not missing, f"MoE families of transformers without an adapter: {sorted(missing)}"
    assert not supported & set(NO_ADAPTER_YET), "listed as unsupported but an adapter exists"
    assert not supported & later, "registered although declared for a later transformers"
    assert derived == supported | set(NO_ADAPTER_YET) | later


def test_families_of_a_later_transformers_name_their_release():
    """A family declared with `since` is registered exactly where the installed transformers has reached that
    release; every registered family's model types are known to it, so on the oldest release pyproject.toml
    admits a newer family declared without `since` fails here by name."""
    import re
    from pathlib import Path

    import transformers

    from moepress.models.declared import FAMILIES
    from moepress.models.families import NEEDS_NEWER_TRANSFORMERS, release, transformers_knows, transformers_release

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = release(re.search(r'"transformers>=([\d.]+)', pyproject).group(1))
    installed = transformers_release()
    supported_model_types()  # registers every family
    for model_type, since in NEEDS_NEWER_TRANSFORMERS.items():
        assert floor < release(since), f"{model_type}: since={since} is not newer than pyproject's floor"
        assert installed < release(since), f"{model_type}: since={since}, but it was not registered"
    for spec in FAMILIES.values():
        unknown = [t for t in spec.model_types if not transformers_knows(t)]
        assert not unknown, f"{spec.name}: transformers {transformers.__version__} lacks {unknown}; declare since="
        if spec.since is not None:
            assert floor < release(spec.since) <= installed, f"{spec.name}: since={spec.since}"


def _check_block_equivalence(model):
    adapter = get_adapter(model)
    torch.manual_seed(0)
    blocks = adapter.blocks(model)
    assert blocks
    for block in blocks.values():
        x = torch.randn(3, 7, block.hidden_size)
        with torch.no_grad():
            ref = block.module(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            ours = block.forward(x)
            ref = ref.reshape(ours.shape)  # Llama-4's block returns [N, H]
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert ref.abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("family", declared_families())
def test_declared_block_matches_model(family):
    _check_block_equivalence(tiny_model(family))


IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("family", declared_families())
def test_declared_family_outputs_round_trip(family, tmp_path):
    for kind in KINDS:
        model = tiny_model(family)
        adapter = get_adapter(model)
        moe = adapter.moe_layer_ids(model)
        plan = kind_plan(kind, moe)
        novices_ok = adapter.block(moe[0], adapter.layers(model)[moe[0]]).supports_novices
        if any(plan.novices(i) for i in moe) and not novices_ok:
            with pytest.raises(MoepressError, match="novice"):
                apply_plan(model, plan)
            continue
        compressed = apply_plan(model, plan)
        want = _logits(compressed)
        out = save_compressed(compressed, plan, tmp_path / kind)
        torch.testing.assert_close(_logits(moepress.load(out)), want, rtol=1e-5, atol=1e-5)
        if kind == "prune_uniform" and adapter.expert_count_shared:  # the count sizes more than the MoE
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == "moepress_" + model.config.model_type
            assert config[adapter.num_experts_key] == getattr(model.config, adapter.num_experts_key)
        elif kind == "prune_uniform":
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == model.config.model_type
            torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), want, rtol=1e-5, atol=1e-5)


# one method per kind of output: pruning (plain), novices, condensing, layer drop, and the merges
METHOD_RUNS = (
    ("frequency", {"ratio": 0.25}),
    ("mone", {"ratio": 0.25}),
    ("cd-moe-sr", {"layers": 1, "experts": 2}),
    ("layer-drop", {"layers": 1}),
    ("hc-smoe", {"ratio": 0.25}),
    ("m-smoe", {"ratio": 0.25}),
    ("ream", {"ratio": 0.25}),
)


NO_NOVICES = ("llama4_text", "longcat_flash")  # llama4: the block weights the experts' input, so a novice
# cannot stand in; longcat_flash: a pruned router's identity-expert slots follow the kept ones
NO_MAPPED_ROUTING = ("llama4_text",)  # merges keeping every router row: its experts run per router row


# one family per kind of block the methods meet (a shared gate, a tuple-returning block with biased
# experts, input-weighted experts, non-gated experts in a hybrid, block-owned biases, a [1, E] bias,
# own routing, another block path, group-limited sigmoid routing, Mamba layers, a non-residual layer);
# MOEPRESS_ALL_FAMILIES=1 runs every declared family (about 10 s each on one core)
METHOD_FAMILIES = (
    declared_families()
    if os.environ.get("MOEPRESS_ALL_FAMILIES")
    else ("qwen3_next", "gpt_oss", "llama4_text", "nemotron_h", "hy_v3", "ernie4_5_moe", "phimoe",
          "granitemoe", "glm4_moe", "jamba", "flex_olmo")
)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_every_method_round_trips(family, tmp_path):
    """Each method, run end to end by `moepress.compress` on real tokenized text, writes a checkpoint that
    reloads to the in-memory compressed model's logits (compress verifies that before the rename) and
    generates."""
    from moepress.pipeline import write_demo_model

    from .conftest import SHARED

    source = write_demo_model(tmp_path / "src", family)
    data = SHARED / "data" / "calib.txt"
    for method, budget in METHOD_RUNS:
        def run(method=method, budget=budget):
            return moepress.compress(source, method, tmp_path / method, data=data, n=4, seq_len=32, device="cpu",
                                     **budget)

        if method == "mone" and family in NO_NOVICES:
            with pytest.raises(MoepressError) as err:
                run()
            assert "\n" not in str(err.value)
            continue
        if method in ("hc-smoe", "m-smoe", "ream") and family in NO_MAPPED_ROUTING:
            with pytest.raises(MoepressError, match="router=representative") as err:
                run()
            assert "\n" not in str(err.value)
            out = run(budget={**budget, "hp": {"router": "representative"}})
        else:
            out = run()
        model = moepress.load(out)
        generated = model.generate(torch.tensor([[1, 70, 71]]), max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 6)


def test_readme_families_table_is_generated_from_the_adapters():
    import re
    from pathlib import Path

    from moepress.models.families import NEEDS_NEWER_TRANSFORMERS, families_markdown, release

    supported_model_types()  # registers every family
    root = Path(__file__).resolve().parents[1]
    # the table is generated on the newest transformers pyproject admits; families of a release past the
    # pin are declared for when it lifts and listed in the text, not the table
    below = re.search(r'"transformers>=[\d.]+,<([\d.]+)"', (root / "pyproject.toml").read_text())[1]
    missing = {t: r for t, r in NEEDS_NEWER_TRANSFORMERS.items() if release(r) < release(below)}
    if missing:
        newest = max(missing.values(), key=release)
        pytest.skip(f"docs/families.md's table lists the families of transformers {newest}, newer than this one")

    doc = (root / "docs" / "families.md").read_text()
    table = doc.split("<!-- families:start -->\n", 1)[1].split("<!-- families:end -->", 1)[0]
    assert table.strip() == families_markdown().strip(), "run `moepress families --markdown`"
