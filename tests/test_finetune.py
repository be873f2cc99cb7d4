"""Fine-tuning recipes: what trains, the reference optimizer and schedule, the unfolded fixed-weight
parametrisation (same forward, folds back to the checkpoint format, updates scale with w), the SFT
stage's answer-only loss and input checks, and `moepress finetune --sft` end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moepress.cli import app
from moepress.errors import MoepressError
from moepress.finetune import RECIPES, finetune, read_sft_pairs, resolve_recipe, tokenize_sft
from moepress.finetune import train as train_mod
from moepress.finetune.parametrise import row_scales, unfolded
from moepress.finetune.train import lr_at, trainable_modules
from moepress.finetune.trainable import condensed_modules, only_trainable
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Condense, Drop
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

from .conftest import DATA

WEIGHTS = [0.5, 0.05]
PLAN = CompressionPlan(method="cd-moe-sr", layers={1: Condense(experts=[0, 3], weights=WEIGHTS), 2: Drop()})



def _model(family: str = "qwen2_moe", apply: bool = True):
    extra = {"layer_types": ["full_attention"] * 3} if family.startswith("qwen") else {}
    model = tiny_model(family, seed=0, num_hidden_layers=3, **extra)
    return apply_plan(model, PLAN) if apply else model


def _train_ids(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(1))


def test_trainable_set_is_the_experts_linears_and_only_they_change():
    model = _model("qwen2_moe")
    names = {id(p): n for n, p in model.named_parameters()}
    mlp = "model.layers.1.mlp"
    linears = {f"{mlp}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    modules = condensed_modules(model, PLAN)
    for recipe, expected in (("reference", linears), ("fast", linears | {f"{mlp}.shared_gate.weight"})):
        with only_trainable(model, trainable_modules(modules, RECIPES[recipe])) as params:
            assert {names[id(p)] for p in params} == expected
            assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, PLAN, _train_ids(), tokens=4 * 16 * 2, lr=1e-3, batch_size=4)  # reference
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == linears  # router-free layer; shared gate, attention, norms, embeddings untouched
    assert all(p.requires_grad for p in model.parameters())


def test_reference_optimizer_and_schedule(monkeypatch):
    r = resolve_recipe("reference")
    assert (r.lr, r.betas, r.eps, r.weight_decay, r.warmup_steps, r.schedule) == (1e-5, (0.9, 0.999), 1e-8, 0.01, 0,
                                                                                  "linear")
    assert (r.batch_size, r.seq_len, r.max_grad_norm, r.fixed_weights_outside, r.train_shared_gate) == (
        8, 256, 1.0, True, False)
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    assert (defaults["betas"], defaults["eps"], defaults["weight_decay"]) == (r.betas, r.eps, r.weight_decay)
    # linear decay from the peak with no warm-up, to ~0 (the reference's max(5e-6, 1 - progress))
    assert [lr_at(r, s, 4, 1.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 5e-6]
    f = resolve_recipe("fast")
    assert (f.lr, f.betas, f.weight_decay, f.schedule, f.fixed_weights_outside, f.train_shared_gate) == (
        1e-4, (0.9, 0.95), 0.0, "cosine", False, True)
    assert lr_at(f, 0, 100, 1.0) == pytest.approx(0.1) and lr_at(f, 99, 100, 1.0) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(MoepressError, match="unknown fine-tuning recipe"):
        resolve_recipe("slow")

    # what the loop really uses: one optimizer per stage with these settings, lr per step as scheduled
    seen = []
    real = train_mod.make_optimizer

    def spy(recipe, params):
        opt = real(recipe, params)
        step = opt.step
        opt.step = lambda *a, **k: (seen.append(dict(opt.param_groups[0])), step(*a, **k))[1]
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    _, result = finetune(_model(), PLAN, _train_ids(), tokens=4 * 16 * 4, batch_size=4)
    assert result.recipe == "reference" and result.hyperparameters == r.to_dict() | {"batch_size": 4}
    assert [g["lr"] for g in seen] == pytest.approx([1e-5, 0.75e-5, 0.5e-5, 0.25e-5])
    assert all((g["betas"], g["eps"], g["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01) for g in seen)


def test_unfolded_parametrisation_is_the_same_function_and_folds_back_to_the_trained_weights():
    source = _model("deepseek_v2", apply=False)
    model = apply_plan(copy.deepcopy(source), PLAN)
    modules = condensed_modules(model, PLAN)
    mlp = modules[1]
    scale = row_scales(mlp, PLAN.layers[1])
    shared, per = mlp.shared_rows, 16
    assert scale.tolist() == pytest.approx([1.0] * shared + [0.5] * per + [0.05] * per)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    folded_out, folded_down = mlp(x), mlp.down_proj.weight.detach().clone()
    with torch.no_grad(), unfolded(modules, {1: PLAN.layers[1]}):
        torch.testing.assert_close(mlp(x), folded_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mlp.down_proj.weight * scale, folded_down, rtol=1e-6, atol=1e-7)
        # "train": new values for every trained weight, in the unfolded parametrisation
        g = torch.Generator().manual_seed(3)
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.add_(0.1 * torch.randn(lin.weight.shape, generator=g))
        trained = {n: lin.weight.detach().clone() for n, lin in
                   (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
        trained_out = mlp(x)
    assert not mlp.down_proj._forward_pre_hooks  # hook removed
    torch.testing.assert_close(mlp(x), trained_out, rtol=1e-5, atol=1e-6)
    # the folded-back module is what surgery builds from a source whose experts have the trained weights
    block = get_adapter(source).blocks(source)[1]
    with torch.no_grad():
        s = block.shared
        for name, lin in (("gate", s.gate_proj), ("up", s.up_proj)):
            lin.weight.copy_(trained[name][:shared])
        s.down_proj.weight.copy_(trained["down"][:, :shared])
        for j, e in enumerate(PLAN.layers[1].experts):
            g_, u_, d_ = block.experts.weights(e)
            rows = slice(shared + j * per, shared + (j + 1) * per)
            g_.copy_(trained["gate"][rows])
            u_.copy_(trained["up"][rows])
            d_.copy_(trained["down"][:, rows])
    rebuilt = condensed_modules(apply_plan(source, PLAN), PLAN)[1]
    for name in ("gate_proj", "up_proj", "down_proj"):
        torch.testing.assert_close(getattr(mlp, name).weight, getattr(rebuilt, name).weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("recipe", ["reference", "fast"])
def test_one_step_moves_the_effective_columns_by_w_only_in_the_reference_recipe(recipe):
    model = _model("deepseek_v2")
    mlp = condensed_modules(model, PLAN)[1]
    before = mlp.down_proj.weight.detach().clone()
    lr = 1e-3
    finetune(model, PLAN, _train_ids(), recipe=recipe, tokens=4 * 16, lr=lr, batch_size=4, weight_decay=0.0)
    step = (mlp.down_proj.weight.detach() - before).abs() / lr  # first Adam step: |update| = lr per parameter
    shared, per = mlp.shared_rows, 16
    spans = [slice(0, shared), slice(shared, shared + per), slice(shared + per, shared + 2 * per)]
    medians = [float(step[:, s].median()) for s in spans]
    expected = [1.0, *WEIGHTS] if recipe == "reference" else [1.0, 1.0, 1.0]
    assert medians == pytest.approx(expected, rel=0.02)


def _byte_tokenizer():
    from moepress.pipeline import byte_tokenizer

    return byte_tokenizer()


def test_sft_loss_is_on_the_answer_tokens_only(tmp_path):
    tok = _byte_tokenizer()
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Q: sky colour?\nA:", "answer": " blue"},
            {"instruction": "Name a fruit.", "input": "", "output": "apple"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = read_sft_pairs(path)
    assert pairs[0] == ("Q: sky colour?\nA:", " blue")
    assert pairs[1][0].endswith("### Instruction:\nName a fruit.\n\n### Response:\n") and pairs[1][1] == "apple"
    data = tokenize_sft(tok, pairs, max_length=256)
    p = tok("Q: sky colour?\nA:")["input_ids"]
    a = tok(" blue", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(p) + len(a)
    assert data.input_ids[0, :n].tolist() == p + a
    assert data.labels[0, :n].tolist() == [-100] * len(p) + a
    assert (data.labels[0, n:] == -100).all() and data.attention_mask[0].tolist() == [1] * n + [0] * (
        data.input_ids.shape[1] - n)
    # the model's loss with these labels is the mean next-token loss over answer positions only
    model = tiny_model("deepseek_v2", seed=0, vocab_size=260)
    with torch.no_grad():
        loss = model(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels).loss
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    target = data.labels[:, 1:]
    keep = target != -100
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
    torch.testing.assert_close(loss, manual)
    assert int(keep[0].sum()) == len(a)  # " blue" + EOS, nothing of the prompt
    # a row cut to max_length keeps what fits of the answer; a prompt filling it all is skipped
    cut = tokenize_sft(tok, [("ab", "cdef"), ("x" * 12, "y")], max_length=4)
    assert cut.input_ids.tolist() == [tok("abcd")["input_ids"]] and cut.skipped == 1


@pytest.mark.parametrize(("text", "match"), [
    (None, "does not exist"), ("", "no row"), ('{"prompt": "a"\n', "line 1 is not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n{"text": "c"}\n', "line 2 has no prompt/answer"),
])
def test_bad_sft_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "sft.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(MoepressError, match=match) as e:
        read_sft_pairs(path)
    assert "\n" not in str(e.value) and '"prompt" and "answer"' in str(e.value)


# ---- command line ---------------------------------------------------------------------------------------
runner = CliRunner()


def _ok(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stdout


@pytest.fixture(scope="module")
def condensed_out(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V2 with layer 1 condensed by a hand-written plan (no calibration: fast)."""
    from moepress.compression import apply, write_plan
    from moepress.pipeline import write_demo_model

    work = tmp_path_factory.mktemp("ft")
    write_demo_model(work / "tiny")
    plan = CompressionPlan(method="cd-moe-sr", layers={1: Condense(experts=[0, 3], weights=[0.3, 0.1])})
    write_plan(plan, work / "plan.json")
    return apply(work / "tiny", work / "plan.json", work / "cd")


def test_finetune_with_sft_end_to_end(condensed_out, tmp_path):
    import moepress

    calib = tmp_path / "calib.txt"
    calib.write_text((DATA / "calib.txt").read_text()[:6_000])
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q{i}: 2+{i}?\nA:", "answer": f" {2 + i}"}) + "\n"
                           for i in range(5)))
    out = tmp_path / "ft"
    stdout = _ok(["finetune", condensed_out, "--data", calib, "--sft", sft, "--tokens", "1k", "--seq-len", "32",
                  "--batch-size", "4", "--device", "cpu", "-o", out, "--json"])
    printed = json.loads(stdout[stdout.index("{\n"):])  # after transformers' remote-code notice, if any
    assert printed["recipe"] == "reference" and printed["layers"] == [1]
    assert printed["steps"] == 1000 // (4 * 32) and printed["sft_steps"] == 2 and printed["sft_examples"] == 5
    record = json.loads((out / "moepress_finetune.json").read_text())
    assert record["hyperparameters"]["lr"] == 1e-5 and record["hyperparameters"]["betas"] == [0.9, 0.999]
    assert record["sft"] == str(sft.resolve()) and len(record["sft_losses"]) == 2
    assert (out / "model.safetensors").read_bytes() != (condensed_out / "model.safetensors").read_bytes()
    model = moepress.load(out)
    with torch.no_grad():
        new = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 7)


def test_a_bad_sft_file_fails_before_any_weight_is_read(condensed_out, tmp_path, monkeypatch):
    import moepress.models.loading as loading

    def no_load(*_a, **_k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "load_model", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n')
    result = runner.invoke(app, ["finetune", str(condensed_out), "--data", str(DATA / "calib.txt"), "--sft",
                                 str(bad), "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, MoepressError)  # `moepress` (cli.main) prints it as one line, exit 2
    assert "line 1 has no prompt/answer" in str(result.exception)
