"""`moepress demo`: the grammar, the cached demo model, and the end-to-end run (quick settings)."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer

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
def _table_rows(printed: str) -> dict[str, str]:
    """The printed table's rows by method: lines that start with a method name and show a size."""
    rows = {}
    for line in printed.splitlines():
        m = re.match(r"(\S+)\s.*\d MiB\s+\d+\.\d%", line)
        if m:
            rows[m.group(1)] = line
    return rows


def _unigram_ppl(train: str, heldout: str, tokenizer) -> float:
    """Perplexity of add-one unigram counts from the training text on the held-out text."""
    train_ids = tokenizer(train, add_special_tokens=False)["input_ids"]
    ids = tokenizer(heldout, add_special_tokens=False)["input_ids"]
    counts = Counter(train_ids)
    total, vocab = len(train_ids), len(tokenizer)
    return math.exp(-sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids) / len(ids))


def test_quick_demo_end_to_end_and_cache_reuse(tmp_path, monkeypatch, capsys):
    import moepress
    import moepress.demo.train as demo_train
    from moepress.cli import main
    from moepress.evaluate.perplexity import load_eval_ids, perplexity

    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "moepress-demo"
    console, buf = _console()
    rows = run_demo(out=out, quick=True, console=console)
    printed = buf.getvalue()

    # one table with every method, in order, each row as returned
    assert [r["method"] for r in rows] == ["original", *METHODS]
    table = _table_rows(printed)
    assert list(table) == ["original", *METHODS]
    for r in rows:
        assert f"{r['ppl']:.2f}" in table[r["method"]]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["trained"] is True
    assert [r["method"] for r in summary["rows"]] == ["original", *METHODS]

    # evaluated on held-out text, not on the calibration text, and the trained model beats unigrams
    model_dir = Path(summary["model"])
    assert Path(summary["data"]) == model_dir / "train.txt"
    assert Path(summary["eval_data"]) == model_dir / "heldout.txt"
    train, heldout = (model_dir / "train.txt").read_text(), (model_dir / "heldout.txt").read_text()
    assert train != heldout and heldout not in train
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = rows[0]
    assert original["ppl"] < _unigram_ppl(train, heldout, tokenizer) < len(tokenizer)

    # comparable sizes: every method smaller than the original, all within a few percent of each other
    sizes = [r["bytes_pct"] for r in rows[1:]]
    assert max(sizes) < 100 and max(sizes) - min(sizes) < 6

    # every checkpoint: written, verified, reloadable, generates, and is the model that was evaluated
    eval_ids = load_eval_ids(tokenizer, model_dir / "heldout.txt", max_tokens=summary["sizes"]["eval_tokens"])
    for r in rows[1:]:
        assert r["ppl"] > 0 and r["js"] > 0 and 0 < r["top1"] <= 1
        folder = out / r["method"]
        assert Path(r["path"]) == folder
        for name in ("moepress_eval.json", "moepress_manifest.json", "moepress_plan.json", "config.json"):
            assert (folder / name).is_file()
        assert (folder / "moepress_stats" / "stats.json").is_file()
        assert Path(r["report"]) == folder / "report.html" and Path(r["report"]).is_file()
        model = moepress.load(folder)
        gen = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 6)
        reloaded = perplexity(model, eval_ids, window=summary["sizes"]["seq_len"], batch_size=8).ppl
        assert reloaded == pytest.approx(r["ppl"], rel=1e-4)
    reported = re.search(r"report: (\S+)", printed).group(1)
    assert Path(reported).is_file()

    # a second run, through the CLI: reuses the cached model (never trains), replaces the demo's own
    # folder, and gives the same table
    def no_training(*args, **kwargs):
        raise AssertionError("the cached demo model was trained again")

    monkeypatch.setattr(demo_train, "train", no_training)
    (out / "mone" / "stale.txt").write_text("from the first run")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["moepress", "demo", "--quick", "-o", str(out)])
    main()
    printed = capsys.readouterr().out
    assert "using the cached model" in printed
    assert list(_table_rows(printed)) == ["original", *METHODS]
    again = json.loads((out / SUMMARY_FILE).read_text())
    assert again["trained"] is False
    assert not (out / "mone" / "stale.txt").exists()
    key = [(r["method"], r["bytes"], round(r["ppl"], 6), round(r["js"], 9)) for r in rows]
    assert [(r["method"], r["bytes"], round(r["ppl"], 6), round(r["js"], 9)) for r in again["rows"]] == key


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    from moepress.demo.run import check_demo_output

    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MoepressError, match="--overwrite"):
        run_demo(out=out, quick=True, console=_console()[0])
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "cache").exists()  # refused before training anything
    check_demo_output(out, overwrite=True)  # --overwrite lets it through
    (out / SUMMARY_FILE).write_text("{}")
    check_demo_output(out, overwrite=False)  # a folder the demo wrote is replaced without asking


def test_cli_demo_with_model_needs_data(tmp_path, monkeypatch, capsys):
    from moepress.cli import main

    model = str(mini_model_path("dsv2-mini"))
    monkeypatch.setattr(sys, "argv", ["moepress", "demo", "--model", model, "-o", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_cli_demo_refuses_calibration_text_as_heldout(tmp_path, monkeypatch, capsys):
    from moepress.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("the storm is humid .\n\n")
    model = str(mini_model_path("dsv2-mini"))
    argv = ["moepress", "demo", "--model", model, "--data", str(text), "--eval-data", str(text),
            "-o", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "held-out" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_on_a_real_checkpoint(tmp_path, monkeypatch):
    import moepress
    import moepress.demo.run as demo_run

    path = mini_model_path("dsv2-mini")
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    # CD-MoE-SR's expert search over 4 (not 16) of the 64 experts per layer: the same code, a quarter
    # of the candidates
    monkeypatch.setattr(demo_run, "SR_EXPERT_POOL", 4)
    out = tmp_path / "out"
    rows = run_demo(path, out, budget=1, data=DATA / "calib.txt", eval_data=DATA / "dev.txt",
                    calib_sequences=4, seq_len=64, eval_tokens=256, console=_console()[0])
    assert [r["method"] for r in rows] == ["original", *METHODS]
    assert rows[0]["ppl"] < 1000  # a trained model, not a random one (vocabulary 8192)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["trained"] is False and summary["budget_layers"] == 1
    assert not (tmp_path / "cache" / "demo").exists()  # no demo model trained for --model
    plan = json.loads((out / "cd-moe-s" / "moepress_plan.json").read_text())
    assert len(plan["layers"]) == 1
    sr = json.loads((out / "cd-moe-sr" / "moepress_plan.json").read_text())
    assert [len(a["experts"]) for a in sr["layers"].values()] == [2]
    for r in rows[1:]:
        assert r["bytes"] < rows[0]["bytes"]
    model = moepress.load(out / "mone")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
