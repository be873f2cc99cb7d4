"""`moepress demo`: the grammar, the cached demo model, and the end-to-end run (quick settings)."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console

from moepress.demo import grammar
from moepress.demo.run import METHODS, SUMMARY_FILE, run_demo
from moepress.errors import MoepressError
from tests.conftest import DATA, mini_model_path


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


# ---- grammar ---------------------------------------------------------------------------------------
def test_grammar_is_deterministic_per_seed():
    assert grammar.documents(30, seed=3) == grammar.documents(30, seed=3)
    assert grammar.documents(30, seed=3) != grammar.documents(30, seed=4)
    assert grammar.corpus(2_000, seed=5) == grammar.corpus(2_000, seed=5)
    assert grammar.corpus(2_000, seed=5) != grammar.corpus(2_000, seed=6)


def test_grammar_topics_are_separated():
    words = {t.name: grammar.topic_words(t) for t in grammar.TOPICS}
    shared = grammar.function_words()
    names = list(words)
    for i, a in enumerate(names):
        assert not words[a] & shared
        for b in names[i + 1 :]:
            assert not words[a] & words[b], (a, b, words[a] & words[b])
    docs = grammar.documents(200, seed=0)
    assert {d.topic for d in docs} == set(names)
    for d in docs:
        used = set(d.words)
        assert used <= words[d.topic] | shared
        assert used & words[d.topic]
        # one tense per document: no present-tense "is/are" in a past document and vice versa
        assert not used & ({"is", "are"} if d.tense == "past" else {"was", "were"})


def test_word_tokenizer_one_token_per_word_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    text = grammar.corpus(500, seed=1)
    tok = grammar.word_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    docs = text.count("\n\n")
    assert len(ids) == len(text.split()) + docs
    assert ids.count(tok.eos_token_id) == docs
    assert tok.unk_token_id not in ids
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_load_balancing_loss_is_one_when_even():
    from moepress.demo.train import load_balancing_loss

    even = torch.zeros(64, 8)  # uniform probabilities: f·P summed is exactly 1/E
    assert load_balancing_loss((even,), 2).item() == pytest.approx(1.0)
    skewed = torch.zeros(64, 8)
    skewed[:, 0] = 5.0
    assert load_balancing_loss((skewed,), 2).item() > 1.5


# ---- end to end ------------------------------------------------------------------------------------
def test_quick_demo_end_to_end_and_cache_reuse(tmp_path, monkeypatch):
    import moepress

    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "moepress-demo"
    console, buf = _console()
    rows = run_demo(out=out, quick=True, console=console)
    printed = buf.getvalue()
    assert [r["method"] for r in rows] == ["original", *METHODS]
    for m in METHODS:
        assert m in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["trained"] is True
    original = rows[0]
    for r in rows[1:]:
        assert r["bytes"] < original["bytes"]
        assert r["ppl"] > 0 and r["js"] >= 0
        folder = out / r["method"]
        for name in ("moepress_eval.json", "moepress_manifest.json", "moepress_plan.json"):
            assert (folder / name).is_file()
        assert (folder / "moepress_stats" / "stats.json").is_file()
        model = moepress.load(folder)
        ids = torch.tensor([[4, 5, 6]])
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 6)
    # a second run reuses the cached model (no training) and replaces the demo's own folder
    console, buf = _console()
    again = run_demo(out=out, quick=True, console=console)
    assert json.loads((out / SUMMARY_FILE).read_text())["trained"] is False
    assert "using the cached model" in buf.getvalue()
    assert [(r["method"], r["bytes"], r["ppl"]) for r in again] == [(r["method"], r["bytes"], r["ppl"]) for r in rows]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MoepressError, match="--overwrite"):
        run_demo(out=out, quick=True, console=_console()[0])
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_demo_with_model_needs_data(tmp_path, monkeypatch, capsys):
    from moepress.cli import main

    monkeypatch.setattr(sys, "argv", ["moepress", "demo", "--model", str(tmp_path), "-o", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_demo_on_a_real_checkpoint(tmp_path, monkeypatch):
    import moepress

    path = mini_model_path("dsv2-mini")
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rows = run_demo(path, out, budget=1, data=DATA / "calib.txt", eval_data=DATA / "dev.txt",
                    calib_sequences=4, seq_len=64, eval_tokens=256, console=_console()[0])
    assert [r["method"] for r in rows] == ["original", *METHODS]
    assert rows[0]["ppl"] < 1000  # a trained model, not a random one
    plan = json.loads((out / "cd-moe-s" / "moepress_plan.json").read_text())
    assert len(plan["layers"]) == 1
    model = moepress.load(out / "mone")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
