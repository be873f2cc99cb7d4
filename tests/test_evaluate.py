"""Evaluation: perplexity against a hand computation, divergence identities, the lm-eval bridge on a
rigged model with a known answer pattern, speed/bytes accounting on CPU, and the comparison rows."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from moepress.errors import MoepressError
from moepress.evaluate import (
    compare_speed,
    comparison_rows,
    decode_bytes_per_token,
    divergence,
    divergence_from_logits,
    evaluate_pair,
    js_divergence_from_logits,
    kl_divergence_from_logits,
    perplexity,
    rows_table,
)
from moepress.evaluate.perplexity import sliding_windows
from moepress.testing import tiny_model

from .conftest import DATA, mini_model_path

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def hand_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Σ −log p over scored targets, one window at a time, as the Hugging Face perplexity guide does."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
            for t in range(max(begin + 1, prev_end), end):
                total -= logp[t - 1 - begin, ids[t]].item()
                count += 1
            prev_end = end
            if end == len(ids):
                break
    return total, count


@pytest.fixture(scope="module")
def ds_model():
    return tiny_model("deepseek_v2")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stride", [16, 6])
def test_perplexity_equals_exp_of_hand_nll(ds_model, ids, stride):
    total, count = hand_nll(ds_model, ids, window=16, stride=stride)
    r = perplexity(ds_model, ids, window=16, stride=stride, batch_size=3)
    assert r.tokens == count == (len(ids) - 1 if stride < 16 else len(ids) - math.ceil(len(ids) / 16))
    assert abs(r.nll - total / count) < 1e-5
    assert abs(r.ppl - math.exp(total / count)) / r.ppl < 1e-5


def test_perplexity_documents_and_budget(ds_model, ids):
    rows = ids[:64].view(4, 16)
    by_rows = perplexity(ds_model, rows, window=16)
    # four documents of one window each: same as the first 64 tokens as one stream
    stream = perplexity(ds_model, ids, window=16, max_tokens=64)
    assert by_rows.tokens == stream.tokens == 60
    assert abs(by_rows.nll - stream.nll) < 1e-6
    with pytest.raises(MoepressError):
        perplexity(ds_model, ids, window=16, stride=17)


def test_perplexity_of_trained_checkpoint_on_dev_text():
    from moepress.evaluate import load_eval_ids
    from moepress.models.loading import load_model

    model, tok = load_model(mini_model_path("dsv2-mini"), dtype="float32")
    ids = load_eval_ids(tok, DATA / "dev.txt", max_tokens=512)
    assert ids.shape == (512,)
    r = perplexity(model, ids, window=128, batch_size=4)
    assert r.tokens == 508 and 10 < r.ppl < 300  # a trained model, far below the 8192-token vocabulary


def test_windows_score_every_target_once():
    for length, window, stride in [(70, 16, 16), (70, 16, 5), (16, 16, 8), (3, 16, 16)]:
        scored = [t for w in sliding_windows(length, window, stride) for t in range(w.first, w.end)]
        if stride < window:
            assert scored == list(range(1, length))
        else:
            assert len(scored) == len(set(scored))


def test_divergence_matches_formulas_and_chunking():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 11, 50, generator=g) * 3, torch.randn(3, 11, 50, generator=g) * 3
    q[..., :5] = float("-inf")  # Q gives no mass to 5 tokens: JS stays finite, KL(P‖Q) is infinite
    pp, qq = p.double().softmax(-1), q.double().softmax(-1)
    mm = (pp + qq) / 2
    js = 0.5 * (pp * (pp / mm).log()).sum(-1) + 0.5 * torch.where(qq > 0, qq * (qq / mm).log(), 0).sum(-1)
    chunked, whole = divergence_from_logits(p, q, chunk=7), divergence_from_logits(p, q, chunk=10_000)
    assert abs(chunked.js - js.mean().item()) < 1e-6 and abs(chunked.js - whole.js) < 1e-9
    assert 0 < chunked.js <= math.log(2)
    assert chunked.top1_agreement == whole.top1_agreement and chunked.tokens == whole.tokens == 33
    assert math.isinf(chunked.kl)
    assert abs(js_divergence_from_logits(p, q, chunk=4) - js_divergence_from_logits(q, p, chunk=4)) < 1e-9
    r = torch.randn(3, 11, 50, generator=g)
    rr = r.double().softmax(-1)
    kl = (pp * (pp.log() - rr.log())).sum(-1).mean().item()
    assert abs(kl_divergence_from_logits(p, r, chunk=5) - kl) < 1e-5
    assert abs(kl_divergence_from_logits(p, r, chunk=5) - kl_divergence_from_logits(p, r, chunk=64)) < 1e-9


def test_divergence_of_models(ds_model, ids):
    self_d = divergence(ds_model, ds_model, ids, window=16, batch_size=2)
    assert self_d.js < 1e-9 and abs(self_d.kl) < 1e-9 and self_d.top1_agreement == 1.0
    assert self_d.tokens == len(ids)
    other = tiny_model("deepseek_v2", seed=1)
    ab = divergence(ds_model, other, ids, window=16, chunk=5)
    ba = divergence(other, ds_model, ids, window=16, chunk=1000)
    assert ab.js > 1e-4 and abs(ab.js - ba.js) < 1e-7
    assert ab.kl >= 0 and ba.kl >= 0
    assert ab.top1_agreement == ba.top1_agreement < 1.0


def test_decode_bytes_per_token_by_hand():
    model = tiny_model("qwen2_moe")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters()) * 4
    routed_layer = cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    unread = cfg.num_hidden_layers * routed_layer * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    embed_unread = (cfg.vocab_size - 1) * cfg.hidden_size * 4
    assert decode_bytes_per_token(model) == round(total - unread - embed_unread)


def test_speed_on_cpu_reports_ratios_and_flag():
    original = tiny_model("qwen2_moe")
    smaller = tiny_model("qwen2_moe", num_experts=4)  # stands in for a 50%-pruned model
    cmp = compare_speed(original, smaller, batch_sizes=(1, 2), prompt_len=8, new_tokens=3, repeats=1)
    assert cmp.cpu_timing and cmp.device == "cpu" and cmp.original.note
    assert set(cmp.decode_speedup) == set(cmp.prefill_speedup) == {1, 2}
    assert all(v > 0 for v in [*cmp.decode_speedup.values(), *cmp.prefill_speedup.values()])
    assert cmp.peak_memory_ratio == {1: None, 2: None}
    assert 0.5 < cmp.bytes_ratio < 1.0
    # top-2 of 8 and top-2 of 4 read the same expert bytes; only the router lost 4 rows per layer
    cfg = original.config
    saved = cfg.num_hidden_layers * 4 * cfg.hidden_size * 4
    assert cmp.original.decode_bytes_per_token - cmp.compressed.decode_bytes_per_token == saved
    assert cmp.decode_bytes_limit_speedup == pytest.approx(
        cmp.original.decode_bytes_per_token / cmp.compressed.decode_bytes_per_token
    )
    json.dumps(cmp.to_dict())


def test_compiled_static_cache_decoding_matches_eager_and_reports_limits():
    """The compiled loop (static cache, one-token steps through torch.compile) decodes the same greedy
    tokens as eager generation. Traced with the "eager" backend: inductor takes minutes on a CPU."""
    from transformers import StaticCache

    from moepress.evaluate.speed import (
        compile_step,
        decode_bytes_per_step,
        decode_bytes_per_token,
        measure_speed,
        static_decode,
    )

    model = tiny_model("qwen2_moe", num_hidden_layers=2, layer_types=["full_attention"] * 2)
    prompt = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    step = compile_step(model, backend="eager")
    cache = StaticCache(config=model.config, max_cache_len=9)
    with torch.no_grad():
        _, tokens = static_decode(model, step, prompt, 3, cache)
        _, again = static_decode(model, step, prompt, 3, cache)  # the cache resets between runs
        eager = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)[:, 6:]
    assert torch.equal(tokens, eager) and torch.equal(again, eager)

    # the shapes above: the traced graph is reused
    res = measure_speed(model, batch_sizes=(2,), prompt_len=6, new_tokens=3, repeats=1,
                        compile_mode="reduce-overhead", compile_backend="eager", bandwidth=1e9)
    assert res.compile_mode == "reduce-overhead" and res.bandwidth_bytes_per_s == 1e9
    for field in ("compiled_decode_tokens_per_s", "compiled_bytes_limit_fraction", "bytes_limit_fraction"):
        values = getattr(res, field)
        assert set(values) == {2} and all(math.isfinite(v) and v > 0 for v in values.values())
    # weights one step reads (+ the KV cache); a larger batch hits more experts, never all weights twice
    assert res.decode_bytes_per_step[2] > decode_bytes_per_step(model, 2) > decode_bytes_per_token(model)
    assert decode_bytes_per_step(model, 1) == res.decode_bytes_per_token
    assert decode_bytes_per_step(model, 32) < res.param_bytes["total"]
    json.dumps(res.to_dict())


def test_evaluate_pair_rows(ds_model, ids):
    other = tiny_model("deepseek_v2", seed=1)
    out = evaluate_pair(other, ds_model, tokenizer=None, ppl_ids=ids, window=16)
    json.dumps(out)
    rows = {r["metric"]: r for r in out["rows"]}
    ppl = rows["perplexity"]
    assert ppl["retained_pct"] == pytest.approx(100 * ppl["original"] / ppl["compressed"])
    assert rows["top-1 agreement"]["original"] == 1.0
    assert rows["parameter bytes"]["retained_pct"] == pytest.approx(100.0)
    assert out["divergence"]["js"] > 0 and out["tasks"] is None and out["speed"] is None
    rows_table(comparison_rows(param_bytes=(10, 5)))


def test_missing_task_data_is_a_user_error(tmp_path, monkeypatch):
    from moepress.evaluate.lm_eval_bridge import write_task_files

    monkeypatch.delenv("MOEPRESS_TASK_DATA", raising=False)
    with pytest.raises(MoepressError, match="piqa"):
        write_task_files(["piqa"], tmp_path)
    with pytest.raises(MoepressError, match="does not exist"):
        write_task_files(["hellaswag"], tmp_path, data_dir=tmp_path)


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install -e '.[eval]')")
def test_lm_eval_bridge_scores_rigged_model(tmp_path, monkeypatch):
    from moepress.evaluate.lm_eval_bridge import run_tasks

    tokenizer = word_tokenizer(
        ["[PAD]", "[UNK]", "<s>", "</s>", "Question", ":", "Answer", "good", "bad", "the", "cat", "dog", "?"]
    )
    model = tiny_model("qwen2_moe", pad_token_id=0, bos_token_id=2, eos_token_id=3)
    # the model always prefers the word "good" by a wide margin, so it answers "good" every time
    bonus = torch.zeros(model.config.vocab_size)
    bonus[tokenizer.convert_tokens_to_ids("good")] = 30.0
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bonus)
    rows = [
        {"goal": "the cat ?", "sol1": "good", "sol2": "bad", "label": 0},
        {"goal": "the dog ?", "sol1": "bad", "sol2": "good", "label": 1},
        {"goal": "the cat", "sol1": "good", "sol2": "bad", "label": 0},
        {"goal": "the dog", "sol1": "good", "sol2": "bad", "label": 1},  # gold is "bad": a miss
    ]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("MOEPRESS_TASK_DATA", str(tmp_path))
    scores = run_tasks(model, tokenizer, ["piqa"], batch_size=4)
    s = scores["piqa_local"]
    assert (s.acc, s.acc_norm, s.samples) == (0.75, 0.75, 4)
    assert s.data == str((tmp_path / "piqa.jsonl").resolve())
