"""MXFP4 (gpt-oss): the on-disk layout transformers 5.x reads, dequantisation bit for bit as transformers
does it, quantisation as triton_kernels does it (with canonical codes), and a tiny checkpoint that
`from_pretrained(..., Mxfp4Config(dequantize=True))` loads."""

from __future__ import annotations

import math

import pytest
import torch

from moepress.errors import MoepressError
from moepress.quant import SCHEMES, folder_scheme, scheme_for
from moepress.quant.fixtures import GPT_OSS_MXFP4_CONFIG, write_tiny_gpt_oss_mxfp4
from moepress.quant.mxfp4 import FP4_VALUES, MXFP4

from .quant_helpers import same_bits, stored_tensors

W = "model.layers.0.mlp.experts.gate_up_proj"


def scheme() -> MXFP4:
    return MXFP4(GPT_OSS_MXFP4_CONFIG)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def randomstored_tensors(experts=3, rows=40, groups=4, seed=0, low=0, high=255):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(low, high, (experts, rows, groups), dtype=torch.uint8, generator=g)
    return {W + "_blocks": blocks, W + "_scales": scales}


def test_registered_and_found_from_config():
    assert MXFP4 in SCHEMES
    s = scheme_for({"quantization_config": GPT_OSS_MXFP4_CONFIG})
    assert isinstance(s, MXFP4) and s.expert_axis == 0 and s.name == "mxfp4"
    assert not MXFP4.matches({"quant_method": "fp8"})


def test_names():
    stored = [
        "model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.mlp.experts.gate_up_proj_scales",
        "model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.experts.down_proj_blocks",
        "model.layers.0.mlp.experts.down_proj_scales", "model.layers.0.mlp.experts.down_proj_bias",
        "model.layers.1.mlp.experts.down_proj_blocks",  # no scales: not a quantised weight
        "model.layers.0.mlp.router.weight",
    ]
    assert scheme().logical_names(stored) == {
        "model.layers.0.mlp.experts.gate_up_proj": [
            "model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.mlp.experts.gate_up_proj_scales"],
        "model.layers.0.mlp.experts.down_proj": [
            "model.layers.0.mlp.experts.down_proj_blocks", "model.layers.0.mlp.experts.down_proj_scales"],
    }
    assert scheme().stored_names(W) == [W + "_blocks", W + "_scales"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = randomstored_tensors(high=256)  # every code and every exponent, 255 (2^128 = inf) included
    ref = convert_moe_packed_tensors(stored[W + "_blocks"].clone(), stored[W + "_scales"].clone(), dtype=dtype)
    ours = scheme().dequantize(W, stored, dtype)
    assert ours.shape == ref.shape == (3, 4 * 32, 40) and ours.dtype == dtype
    assert torch.equal(bits(ours), bits(ref))


def test_layout_low_nibble_first_rows_are_outputs():
    """Byte j of a group holds elements 2j (low nibble) and 2j+1 (high); the float weight is [E, K, R]."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 1, 0, 0] = 0x72  # element 0: code 2 (1.0), element 1: code 7 (6.0)
    scales = torch.full((1, 2, 1), 128, dtype=torch.uint8)  # 2^1
    w = scheme().dequantize(W, {W + "_blocks": blocks, W + "_scales": scales}, torch.float32)
    assert w.shape == (1, 32, 2)
    assert w[0, 0, 1] == 2.0 and w[0, 1, 1] == 12.0 and w[0, :, 0].abs().sum() == 0 and w[0, 2:].abs().sum() == 0


def canonicalstored_tensors(seed=0, experts=2, rows=24, groups=3):
    """Stored tensors as a quantiser writes them: each group's largest magnitude 4 or 6 (or all zero,
    exponent byte 0), both signs of zero."""
    stored = randomstored_tensors(experts, rows, groups, seed, low=100, high=160)
    blocks = stored[W + "_blocks"]
    codes = torch.stack((blocks & 0xF, blocks >> 4), -1).reshape(experts, rows, groups, 32)
    mag, sign = codes & 7, codes & 8
    mag = mag.clamp(max=5)  # at most 3.0 ...
    mag[..., 7] = 6 + (torch.arange(experts * rows * groups).reshape(experts, rows, groups) % 2)  # ... then 4 or 6
    mag[0, 0, 0] = 0  # an all-zero group: exponent 0, signed zeros
    stored[W + "_scales"][0, 0, 0] = 0
    codes = (mag | sign).reshape(experts, rows, groups, 16, 2)
    stored[W + "_blocks"] = codes[..., 0] | (codes[..., 1] << 4)
    return stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_of_dequantized_is_the_stored_bits(dtype):
    s, stored = scheme(), canonicalstored_tensors()
    again = s.quantize(W, s.dequantize(W, stored, dtype))
    assert again.keys() == stored.keys()
    for name in stored:
        assert again[name].dtype == torch.uint8 and torch.equal(again[name], stored[name]), name


def test_quantize_of_any_stored_tensors_keeps_their_values():
    """A group whose largest code is 3 or less (not canonical) gets other codes, never other values."""
    s, stored = scheme(), randomstored_tensors(low=90, high=170)
    w = s.dequantize(W, stored, torch.float32)
    assert torch.equal(bits(s.dequantize(W, s.quantize(W, w), torch.float32)), bits(w))


def reference_values(w: torch.Tensor) -> torch.Tensor:
    """MXFP4's values of w [K, R] written from the rule, in float64: scale 2^ceil(log2(fl32(amax / 6))),
    nearest e2m1, ties away from zero (triton_kernels' downcast_to_mxfp_torch, ROUND_UP)."""
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    out = torch.empty_like(w, dtype=torch.float64)
    k, r = w.shape
    for col in range(r):
        for g0 in range(0, k, 32):
            group = w[g0:g0 + 32, col].tolist()
            amax = max(abs(v) for v in group)
            ds = float(torch.tensor(amax, dtype=torch.float32) / 6.0)
            scale = 0.0 if ds == 0 else 2.0 ** math.ceil(math.log2(ds))
            for i, v in enumerate(group):
                a = abs(v) / scale if scale else 0.0
                nearest = min(grid, key=lambda c: (abs(c - a), -c))  # ties: the larger magnitude
                out[g0 + i, col] = math.copysign(nearest * scale, v)
    return out


def test_quantize_values_follow_the_reference_rule():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 6, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 7.0, 300.0, 1e-30])
    # exact ties: the group's amax is 6 (scale 1), every midpoint between e2m1 magnitudes, both signs
    w[:, 0] = 0.0
    w[:15, 0] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
    w[15, 0] = -0.1  # rounds to -0
    got = scheme().dequantize("w", scheme().quantize("w", w[None]), torch.float32)[0]
    assert torch.equal(bits(got), bits(reference_values(w).float()))
    assert got[:8, 0].tolist() == [6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert got[15, 0].item() == 0.0 and torch.signbit(got[15, 0])


def test_quantize_error_bound_and_idempotence():
    s = scheme()
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(4, 96, 48, generator=g) * 0.02).to(torch.bfloat16)
    q = s.quantize(W, w)
    assert q[W + "_blocks"].shape == (4, 48, 3, 16) and q[W + "_scales"].shape == (4, 48, 3)
    back = s.dequantize(W, q, torch.float32)
    # largest e2m1 step is 2 (between 4 and 6): no value is off by more than 1 · its group's scale
    exps = q[W + "_scales"].to(torch.int32) - 127
    step = torch.ldexp(torch.ones(exps.shape), exps).repeat_interleave(32, -1).transpose(1, 2)
    assert ((back - w.float()).abs() <= step).all()
    assert ((back - w.float()).norm() / w.float().norm()) < 0.15
    again = s.quantize(W, back.to(torch.bfloat16))
    assert all(torch.equal(again[n], q[n]) for n in q)


def test_expert_slices_quantise_on_their_own():
    """expert_axis = 0: expert e's slice of the stored tensors encodes expert e's slice of the weight."""
    s = scheme()
    w = torch.randn(5, 64, 16, generator=torch.Generator().manual_seed(3))
    whole = s.quantize(W, w)
    for e in range(5):
        one = s.quantize(W, w[e : e + 1])
        assert all(torch.equal(one[n][0], whole[n][e]) for n in whole)
        assert torch.equal(s.dequantize(W, {n: t[e : e + 1] for n, t in whole.items()}, torch.float32)[0],
                          s.dequantize(W, whole, torch.float32)[e])


def test_shape_errors_name_the_fix():
    s, stored = scheme(), randomstored_tensors()
    bad = {W + "_blocks": stored[W + "_blocks"], W + "_scales": stored[W + "_scales"][:, :-1]}
    for case, words in [
        (bad, "not MXFP4's"),
        ({W + "_blocks": stored[W + "_blocks"]}, "incomplete"),
        ({W + "_blocks": stored[W + "_blocks"].float(), W + "_scales": stored[W + "_scales"]}, "not uint8"),
    ]:
        with pytest.raises(MoepressError, match=words) as err:
            s.dequantize(W, case, torch.float32)
        assert "\n" not in str(err.value)
    with pytest.raises(MoepressError, match="multiple of 32"):
        s.quantize(W, torch.randn(2, 48, 8))
    with pytest.raises(MoepressError, match="NaN"):
        s.quantize(W, torch.full((1, 32, 2), float("nan")))


def test_configs():
    s = scheme()
    assert s.output_config([]) == GPT_OSS_MXFP4_CONFIG
    out = s.output_config(["model.layers.1.mlp"])
    assert out["quant_method"] == "mxfp4" and "model.layers.1.mlp" in out["modules_to_not_convert"]
    assert set(GPT_OSS_MXFP4_CONFIG["modules_to_not_convert"]) <= set(out["modules_to_not_convert"])
    tc = s.transformers_config()
    assert tc.dequantize and tc.quant_method == "mxfp4"
    assert tc.modules_to_not_convert == GPT_OSS_MXFP4_CONFIG["modules_to_not_convert"]


def test_tiny_checkpoint_loads_in_transformers(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = write_tiny_gpt_oss_mxfp4(tmp_path, seed=0)
    cfg = model.config
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        prefix = "model.layers.1.mlp.experts."
        names = [n for n in f.keys() if n.startswith(prefix)]
        shapes = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in names}
    assert shapes == {
        prefix + "gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), "U8"),
        prefix + "gate_up_proj_scales": ((e, 2 * i, h // 32), "U8"),
        prefix + "down_proj_blocks": ((e, h, i // 32, 16), "U8"),
        prefix + "down_proj_scales": ((e, h, i // 32), "U8"),
        prefix + "gate_up_proj_bias": ((e, 2 * i), "BF16"),
        prefix + "down_proj_bias": ((e, h), "BF16"),
    }
    assert isinstance(folder_scheme(tmp_path), MXFP4)

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).eval()
    ours = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(bits(param.data), bits(ours[name].data)), name
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_fp4_table_is_transformers():
    from transformers.integrations.mxfp4 import FP4_VALUES as REF

    assert [bits(torch.tensor(v)).item() for v in FP4_VALUES] == [bits(torch.tensor(v)).item() for v in REF]


# -- end to end: a gpt-oss MXFP4 input compressed, the output kept in MXFP4 -------------------------------

EXPERTS = ".mlp.experts."
PROJ = ("gate_up_proj", "down_proj")






def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if EXPERTS in k)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mxfp4") / "tiny-gpt-oss-mxfp4"
    write_tiny_gpt_oss_mxfp4(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from moepress.demo.grammar import corpus

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(corpus(3000, seed=1))
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


def _compress(source, text, out, method, stream=False):
    import moepress

    return moepress.compress(source, method, out, data=text, ratio=0.25, n=4, seq_len=32, device="cpu",
                             stream=stream)


@pytest.mark.parametrize("stream", [False, True])
def test_pruned_mxfp4_output_keeps_every_kept_expert_bit_for_bit(mxfp4, text, tmp_path, stream):
    import json

    from transformers import AutoModelForCausalLM

    import moepress
    from moepress.plan import CompressionPlan
    from moepress.quant.requantize import load_kwargs
    from moepress.surgery import apply_plan

    out = _compress(mxfp4, text, tmp_path / "out", "frequency", stream)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == GPT_OSS_MXFP4_CONFIG and config["num_local_experts"] == 6
    source, written = stored_tensors(mxfp4), stored_tensors(out)
    plan = CompressionPlan.load(out / "moepress_plan.json")
    for layer, entry in plan.layers.items():  # expert slices of the stored blocks and scales, renumbered
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj in PROJ:
            for suffix in ("_blocks", "_scales", "_bias"):
                name = prefix + proj + suffix
                assert same_bits(written[name], source[name][entry.keep_experts]), name
            assert prefix + proj not in written  # no float copy of an expert weight
    for name, tensor in source.items():  # attention, norms, embeddings untouched; routers sliced
        if EXPERTS in name:
            continue
        if ".mlp.router." in name:
            tensor = tensor[plan.layers[int(name.split(".")[2])].keep_experts]
        assert same_bits(written[name], tensor), name
    assert _nbytes(written) == _nbytes(source) * 6 // 8
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": "mxfp4", "copied": 2 * 6 * len(plan.layers), "quantized": [],
                                        "unquantized": []}
    # logits: dequantise → prune (the same plan) equals the output read back dequantised
    reference = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32, **load_kwargs(mxfp4)).eval()
    if stream:  # a streamed plan's fingerprint is the streamer's config's, which keeps quantization_config
        plan = plan.model_copy(update={"model_fingerprint": None})
    reference = apply_plan(reference, plan)
    loaded = moepress.load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)


def test_new_experts_are_quantised_in_mxfp4(mxfp4, tmp_path):
    """A merge creates an expert no source expert equals: its slice of the layer's blocks and scales is
    quantised (as `MXFP4.quantize` writes it), the kept experts' slices are the source's."""
    import json

    from transformers import AutoModelForCausalLM

    from moepress.io import save_compressed
    from moepress.plan import CompressionPlan, Prune
    from moepress.quant.requantize import load_kwargs
    from moepress.surgery import apply_plan

    model = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.bfloat16, **load_kwargs(mxfp4)).eval()
    plan = CompressionPlan(method="test-merge")
    keep = [0, 1, 2, 3, 4, 5]
    plan.layers = {1: Prune(keep_experts=keep)}
    compressed = apply_plan(model, plan)
    with torch.no_grad():
        experts = compressed.model.layers[1].mlp.experts
        experts.gate_up_proj[0] = (experts.gate_up_proj[0] + experts.gate_up_proj[1]) / 2
    out = save_compressed(compressed, plan, tmp_path / "out", source=mxfp4)
    source, written = stored_tensors(mxfp4), stored_tensors(out)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert manifest["quantization"]["quantized"] == [name]
    want = scheme().quantize(name, experts.gate_up_proj[:1].detach())
    for suffix in ("_blocks", "_scales"):
        assert same_bits(written[name + suffix][:1], want[name + suffix])
        assert same_bits(written[name + suffix][1:], source[name + suffix][keep[1:]])
        down = "model.layers.1.mlp.experts.down_proj" + suffix
        assert same_bits(written[down], source[down][keep])
    value = scheme().dequantize(name, written, torch.float32)[0]
    merged = experts.gate_up_proj[0].float()
    assert ((value - merged).norm() / merged.norm()) < 0.15


def test_mone_mxfp4_output_keeps_the_kept_experts_in_mxfp4(mxfp4, text, tmp_path):
    """mone writes gpt-oss in moepress's own format (`experts.kept.*` beside bf16 novice vectors): the
    kept experts are still the source's MXFP4 slices, bit for bit, under their new names."""
    from moepress.plan import CompressionPlan

    out = _compress(mxfp4, text, tmp_path / "out", "mone")
    source, written = stored_tensors(mxfp4), stored_tensors(out)
    plan = CompressionPlan.load(out / "moepress_plan.json")
    assert not [k for k in written if k.endswith(PROJ)], "expert weights written in float"
    for layer, entry in plan.layers.items():
        for proj in PROJ:
            for suffix in ("_blocks", "_scales"):
                layer_prefix, stored = f"model.layers.{layer}.", proj + suffix
                got = [t for k, t in written.items() if k.startswith(layer_prefix) and k.endswith(stored)]
                assert len(got) == 1
                want = source[f"{layer_prefix}mlp.experts.{stored}"][entry.keep_experts]
                assert same_bits(got[0], want)
    assert _nbytes(written) < _nbytes(source)
    # read back dequantised: the kept experts are the source's dequantised slices
    import moepress

    loaded = moepress.load(out, dtype=torch.float32)
    for layer, entry in plan.layers.items():
        kept = loaded.model.layers[layer].mlp.experts.kept
        for proj in PROJ:
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            want = scheme().dequantize(name, source, torch.float32)[entry.keep_experts]
            assert torch.equal(getattr(kept, proj), want)


def test_merged_mxfp4_output_stays_mxfp4(mxfp4, text, tmp_path):
    out = _compress(mxfp4, text, tmp_path / "out", "hc-smoe")
    source, written = stored_tensors(mxfp4), stored_tensors(out)
    assert not [k for k in written if k.endswith(PROJ)], "expert weights written in float"
    assert _nbytes(written) < _nbytes(source)
