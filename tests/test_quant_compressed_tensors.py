"""compressed-tensors in and out (issue 23): `--quantize fp8|w4a16` writes a checkpoint that plain
transformers loads close to the float output, experts included; a compressed-tensors input reads back as
the library itself decompresses it; bad inputs fail in one line before any weight loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("compressed_tensors")

from moepress.cli import app  # noqa: E402
from moepress.errors import MoepressError  # noqa: E402
from moepress.quant import folder_scheme  # noqa: E402
from moepress.quant.compressed_tensors import CompressedTensors  # noqa: E402
from moepress.quant.export import quantize_folder  # noqa: E402

from .conftest import DATA, mini_model_path  # noqa: E402

runner = CliRunner()
ARGS = ["-n", "2", "--seq-len", "32"]  # calibration: seconds


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct")


def cli(args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        raise AssertionError(f"moepress {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}\n{tb}")
    return result.stdout


def fails(args) -> str:
    """The command's user error: a MoepressError (which `moepress` prints as one line, exit 2)."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    assert isinstance(result.exception, MoepressError), (result.output, result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def calib(work) -> Path:
    """The first 20,000 characters of calib.txt: tokenised in no time."""
    path = work / "calib.txt"
    path.write_text((DATA / "calib.txt").read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def fp8_out(work, calib) -> Path:
    """dsv2-mini, frequency pruning, written as FP8-dynamic."""
    out = work / "fp8"
    printed = cli(["compress", mini_model_path("dsv2-mini"), "--method", "frequency", "--ratio", "0.25", "--data",
                   calib, *ARGS, "--quantize", "fp8", "-o", out])
    (work / "fp8.printed").write_text(printed)
    return out


@pytest.fixture(scope="module")
def float_out(work, fp8_out) -> Path:
    """The same plan applied without --quantize: what the quantised outputs approximate."""
    out = work / "float"
    cli(["apply", mini_model_path("dsv2-mini"), fp8_out, "-o", out])
    return out


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no moepress
    ids = torch.linspace(0, model.config.vocab_size - 1, 16).long()[None]
    with torch.no_grad():
        return model(ids).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_fp8_output_loads_in_transformers(fp8_out, float_out):
    qc = json.loads((fp8_out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert {"lm_head", "model.layers.1.mlp.gate"} <= set(qc["ignore"])
    tensors = stored(fp8_out)
    # routed experts are quantised per expert, as save_pretrained lays them out; routers stay float
    expert = "model.layers.1.mlp.experts.0.up_proj"
    assert tensors[expert + ".weight"].dtype == torch.float8_e4m3fn
    assert tensors[expert + ".weight_scale"].shape == (tensors[expert + ".weight"].shape[0], 1)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert relative(logits(fp8_out), logits(float_out)) < 0.15
    manifest = json.loads((fp8_out / "moepress_manifest.json").read_text())
    assert manifest["quantization"]["quantize"] == "fp8"
    assert manifest["stored_bytes_after"] < 0.7 * manifest["stored_bytes_before"]
    assert "--quantize fp8" in (fp8_out / "README.md").read_text()
    # the closing line gives the bytes the shards hold, not the bf16 model's
    printed = " ".join((fp8_out.parent / "fp8.printed").read_text().split())
    mib = f"{manifest['stored_bytes_after'] / 2**20:.1f} MiB stored"
    assert mib in printed and "compressed-tensors fp8" in printed, printed[-400:]


def test_w4a16_output_loads_in_transformers(work, fp8_out, float_out):
    out = work / "w4a16"
    with pytest.warns(UserWarning, match="groups of 64"):  # dsv2-mini's experts have 64 input features
        cli(["apply", mini_model_path("dsv2-mini"), fp8_out, "--quantize", "w4a16", "-o", out])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert qc["config_groups"]["group_1"]["weights"]["group_size"] == 64  # the experts' group
    assert "model.layers.0.self_attn.kv_b_proj" in qc["ignore"]  # 64 input features: kept float
    tensors = stored(out)
    expert = "model.layers.1.mlp.experts.0.down_proj"
    assert tensors[expert + ".weight_packed"].dtype == torch.int32
    assert tensors[expert + ".weight_shape"].tolist() == [256, 64]
    assert relative(logits(out), logits(float_out)) < 0.5


def test_w4a16_novice_output_in_the_native_format(work, calib):
    """MoNE's output (vLLM's native format: retained experts under their ids, `approx_value` vectors) written
    as int4: moepress.load reads the retained experts' packed weights back (it verified them against the
    float model while writing); the folder's remote code refuses in one line rather than misreading them."""
    import moepress

    out = work / "mone-w4a16"
    cli(["compress", mini_model_path("olmoe-mini"), "--method", "mone", "--ratio", "0.25", "--data", calib, *ARGS,
         "--quantize", "w4a16", "-o", out])
    config = json.loads((out / "config.json").read_text())
    assert config["approximate_experts"] and config["quantization_config"]["format"] == "pack-quantized"
    assert any(k.endswith(".approx_value") for k in stored(out))
    model = moepress.load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="moepress.load"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with pytest.raises((RuntimeError, ValueError), match="mismatch|size"):  # the stored experts' count
        AutoModelForCausalLM.from_pretrained(out)


def test_reads_as_the_library_decompresses(tmp_path):
    """A compressed-tensors checkpoint written by moepress's export from a tiny model: moepress's
    per-tensor dequantisation equals what transformers + compressed-tensors load, expert by expert."""
    from transformers import AutoModelForCausalLM

    from moepress.testing import tiny_model

    for name, group in (("fp8", None), ("w4a16", 16)):
        folder = tmp_path / name
        tiny_model("qwen2_moe", dtype=torch.bfloat16).save_pretrained(folder)
        quantize_folder(folder, name, group_size=group)
        scheme = folder_scheme(folder)
        assert isinstance(scheme, CompressedTensors)
        tensors = stored(folder)
        logical = scheme.logical_names(tensors)
        library = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                       quantization_config=scheme.transformers_config())

        def mine(n: str, scheme=scheme, tensors=tensors, logical=logical) -> torch.Tensor:
            return scheme.dequantize(n, {s: tensors[s] for s in logical[n]}, torch.bfloat16)

        attn = "model.layers.0.self_attn.o_proj.weight"
        assert torch.equal(mine(attn), library.get_parameter(attn))
        experts = library.model.layers[0].mlp.experts
        e = 3
        gate, up = (mine(f"model.layers.0.mlp.experts.{e}.{p}_proj.weight") for p in ("gate", "up"))
        assert torch.equal(torch.cat([gate, up]), experts.gate_up_proj[e])
        assert torch.equal(mine(f"model.layers.0.mlp.experts.{e}.down_proj.weight"), experts.down_proj[e])
        # a new weight quantised in the input's format has the stored tensors' names, shapes and dtypes
        fresh = scheme.quantize(attn, mine(attn))
        assert {k: (v.shape, v.dtype) for k, v in fresh.items()} == {k: (tensors[k].shape, tensors[k].dtype)
                                                                        for k in logical[attn]}
        if name == "fp8":  # FP8 rounding is idempotent; int4's scale (max / 7.5) is not: -8·s reads back as 8·s
            assert torch.equal(scheme.dequantize(attn, fresh, torch.bfloat16), mine(attn))


def test_missing_or_wrong_scale_is_one_line(tmp_path):
    from moepress.testing import tiny_model

    folder = tmp_path / "w4"
    tiny_model("qwen2_moe", dtype=torch.bfloat16).save_pretrained(folder)
    quantize_folder(folder, "w4a16", group_size=16)
    scheme = folder_scheme(folder)
    tensors = stored(folder)
    name = "model.layers.0.self_attn.q_proj"
    parts = {k: v for k, v in tensors.items() if k.startswith(name + ".")}
    with pytest.raises(MoepressError, match="has no .*weight_scale"):
        scheme.dequantize(name + ".weight", {k: v for k, v in parts.items() if not k.endswith("weight_scale")},
                          torch.float32)
    wrong = {**parts, name + ".weight_scale": parts[name + ".weight_scale"][:, :1]}
    with pytest.raises(MoepressError, match="weight_scale has shape"):
        scheme.check(name + ".weight", wrong)


def test_bad_quantize_arguments(work, tmp_path):
    model = mini_model_path("dsv2-mini")
    calib = tmp_path / "calib.txt"
    calib.write_text((DATA / "calib.txt").read_text()[:5_000])
    common = ["--method", "frequency", "--ratio", "0.25", "--data", calib, *ARGS]
    assert "--quantize takes fp8, w4a16" in fails(["compress", model, *common, "--quantize", "int3",
                                                   "-o", tmp_path / "a"])
    # an input already quantised: refused before its weights load
    quantised = tmp_path / "quantised"
    shutil.copytree(model, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {}}
    (quantised / "config.json").write_text(json.dumps(config))
    (quantised / "model.safetensors").write_bytes(b"not read")
    assert "is already quantised" in fails(["compress", quantised, *common, "--quantize", "fp8", "-o", tmp_path / "b"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        assert "pip install 'moepress[gptq]'" in fails(["compress", model, *common, "--quantize", "gptq-w4a16",
                                                       "-o", tmp_path / "c"])
    else:
        if not torch.cuda.is_available():
            assert "needs a GPU" in fails(["compress", model, *common, "--quantize", "awq-w4a16", "-o", tmp_path / "c"])
    assert not (tmp_path / "c").exists()


def test_streamed_quantize_matches_in_memory(work, fp8_out):
    """--stream writes layer by layer, then quantises shard by shard (each weight read back): the same
    FP8 checkpoint as the in-memory path, which verified its logits."""
    out = work / "fp8-streamed"
    cli(["apply", mini_model_path("dsv2-mini"), fp8_out, "--stream", "--quantize", "fp8", "-o", out])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    assert torch.equal(logits(out), logits(fp8_out))


def test_nvfp4_tensors_read():
    """NVFP4 (`nvfp4-pack-quantized`): FP4 codes packed two per uint8, FP8 scales per 16 inputs and a
    global scale; read back within FP4's rounding, an incomplete one refused in one line."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    group = preset_name_to_scheme("NVFP4A16", ["Linear"])
    group.format = "nvfp4-pack-quantized"
    config = {**QuantizationConfig(config_groups={"group_0": group}, format="nvfp4-pack-quantized",
                                   quantization_status="compressed").model_dump(mode="json"),
              "quant_method": "compressed-tensors"}
    scheme = CompressedTensors(config)
    torch.manual_seed(0)
    weight = torch.randn(64, 96, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    parts = scheme.quantize(name, weight)
    module = name[: -len(".weight")]
    assert parts[module + ".weight_packed"].dtype == torch.uint8 and parts[module + ".weight_packed"].shape == (64, 48)
    assert parts[module + ".weight_scale"].dtype == torch.float8_e4m3fn
    assert parts[module + ".weight_scale"].shape == (64, 6)
    assert set(scheme.logical_names(parts)) == {name}
    assert relative(scheme.dequantize(name, parts, torch.float32), weight.float()) < 0.15
    with pytest.raises(MoepressError, match="weight_global_scale"):
        scheme.check(name, {k: v for k, v in parts.items() if not k.endswith("global_scale")})
    with pytest.raises(MoepressError, match="global scale"):  # transformers 5.24 would misread its experts
        scheme.transformers_config()
