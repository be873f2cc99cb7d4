"""`moepress report`: a self-contained HTML page built from real compressed outputs of a tiny model."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moepress.errors import MoepressError
from moepress.io import MANIFEST_FILE, PLAN_FILE
from moepress.report import EVAL_FILE, REPORT_FILE, STATS_DIR, collect, write_report
from moepress.report.collect import quality_points

SECTIONS = ("plan", "experts", "search", "bytes", "quality")
NUM_LAYERS = 4  # layer 0 is dense (first_k_dense_replace=1), layers 1-3 are MoE


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A parent folder with three real runs on one tiny model (MoNE, CD-MoE-SR, layer-drop), each with
    its statistics and an evaluation against the original on the same tokens, plus a non-run folder."""
    from moepress.calibrate.runner import calibrate
    from moepress.evaluate.pair import evaluate_pair
    from moepress.io.save import save_compressed
    from moepress.methods.base import get_method
    from moepress.methods.search_registry import get_search_method
    from moepress.surgery.apply import apply_plan
    from moepress.testing import tiny_model

    root = tmp_path_factory.mktemp("runs")
    (root / "notes").mkdir()
    original = tiny_model("deepseek_v2", num_hidden_layers=NUM_LAYERS).eval()
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate(original, ids, batch_size=4).stats
    plans = {
        "mone-25": lambda m: get_method("mone")(stats, 0.25),
        "cd-moe-sr-2": lambda m: get_search_method("cd-moe-sr")(m, ids, layers=2, experts=2, batch_size=4),
        "layer-drop-2": lambda m: get_search_method("layer-drop")(m, ids, layers=2, batch_size=4),
    }
    for name, make in plans.items():
        model = copy.deepcopy(original)
        plan = make(model)
        out = save_compressed(apply_plan(model, plan), plan, root / name)
        stats.save(out / STATS_DIR)
        ev = evaluate_pair(model, original, None, ids, window=16, batch_size=4)
        (out / EVAL_FILE).write_text(json.dumps(ev))
    return root


def _section(page: str, ident: str) -> str:
    found = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert found, f"no section {ident}"
    return found.group(1)


def _plan_layers(page: str) -> dict[int, str]:
    rows = re.findall(r'<tr class="[^"]*"><td class="num">(\d+)</td><td>([^<]*)</td>', _section(page, "plan"))
    return {int(i): action for i, action in rows}


def _assert_self_contained(page: str) -> list[str]:
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(srcs) == page.count("<img")
    assert not re.search(r"(src|href)\s*=\s*(?![\"']?(data:|#))", page, re.I)  # nothing fetched or linked
    assert "url(" not in page and "@import" not in page and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    return srcs


def test_mone_report_has_every_section(runs):
    out = runs / "mone-25"
    path = write_report(out)
    assert path == out / REPORT_FILE
    page = path.read_text()
    for ident in SECTIONS:
        _section(page, ident)
    srcs = _assert_self_contained(page)
    assert len(srcs) == 4  # frequency + variance heat maps, bytes, quality scatter
    assert _plan_layers(page) == {0: "dense (not MoE)", 1: "prune", 2: "prune", 3: "prune"}
    assert "Not available" in _section(page, "search")  # MoNE runs no layer search
    for ident in ("plan", "experts", "bytes", "quality"):
        assert "Not available" not in _section(page, ident)
    assert "routed_experts" in _section(page, "bytes")
    assert "JS divergence" in _section(page, "quality")  # this run's evaluation rows
    head = page[: page.index('<section id="plan">')]
    assert "mone" in head and "fusion_weight" in head and "moepress version" in head


def test_quality_points_cover_every_run_beside_it(runs):
    busy = runs / "mone-50.tmp-0123abcd"  # a run still being written is not compared
    shutil.copytree(runs / "mone-25", busy, ignore=shutil.ignore_patterns("*.safetensors", "moepress_stats"))
    try:
        label, points = quality_points(collect(runs / "mone-25").runs)
    finally:
        shutil.rmtree(busy)
    assert label.startswith("perplexity")
    compressed = {p.label: p.method for p in points if not p.original}
    assert compressed == {"mone-25": "mone", "cd-moe-sr-2": "cd-moe-sr", "layer-drop-2": "layer-drop"}
    assert [p.label for p in points if p.current] == ["mone-25"]
    originals = [p for p in points if p.original]
    assert len(originals) == 1  # the same original on the same tokens is one point
    bytes_before = json.loads((runs / "mone-25" / MANIFEST_FILE).read_text())["bytes_before"]["total"]
    assert originals[0].bytes == bytes_before
    assert all(p.bytes < bytes_before for p in points if not p.original)


def test_cd_moe_report_has_the_search_curve_and_condensed_layers(runs):
    out = runs / "cd-moe-sr-2"
    page = write_report(out).read_text()
    srcs = _assert_self_contained(page)
    assert len(srcs) == 5  # + the search curve
    search = _section(page, "search")
    assert "<img" in search and "layer-drop" in search  # the baseline's curve from the run beside it
    plan = json.loads((out / PLAN_FILE).read_text())
    chosen = {int(i) for i in plan["layers"]}
    assert len(chosen) == 2
    actions = {i: "condense" if i in chosen else "keep" for i in (1, 2, 3)}
    assert _plan_layers(page) == {0: "dense (not MoE)", **actions}
    for i in chosen:  # the fixed weights are listed
        assert f"{plan['layers'][str(i)]['weights'][0]:.4g}" in _section(page, "plan")


def test_missing_parts_are_noted_and_text_is_escaped(runs, tmp_path):
    out = tmp_path / "alone" / "bare"
    out.mkdir(parents=True)
    for name in (PLAN_FILE, "moepress_plan.novices.safetensors", "config.json"):
        shutil.copyfile(runs / "mone-25" / name, out / name)
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["hyperparameters"]["note"] = "<script>alert('x')</script> & more"
    (out / PLAN_FILE).write_text(json.dumps(plan))

    page = write_report(out).read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    for ident in ("experts", "search", "bytes", "quality"):
        assert "Not available" in _section(page, ident)
    assert _assert_self_contained(page) == []
    assert _plan_layers(page) == {0: "keep", 1: "prune", 2: "prune", 3: "prune"}  # no statistics: no MoE map

    (out / REPORT_FILE).unlink()
    dest = tmp_path / "elsewhere" / "r.html"
    assert write_report(out, stats_dir=runs / "mone-25" / STATS_DIR, dest=dest) == dest
    page = dest.read_text()
    assert "Not available" not in _section(page, "experts") and len(_assert_self_contained(page)) == 2
    assert not (out / REPORT_FILE).exists()


def test_not_an_output_is_a_user_error(runs, tmp_path):
    with pytest.raises(MoepressError, match="not a moepress output"):
        write_report(runs / "notes")
    with pytest.raises(MoepressError, match="holds no statistics"):
        write_report(runs / "mone-25", stats_dir=tmp_path)


def test_cli_report(runs, tmp_path, monkeypatch, capsys):
    from moepress.cli import main

    dest = tmp_path / "page.html"
    monkeypatch.setattr(sys, "argv", ["moepress", "report", str(runs / "layer-drop-2"), "-o", str(dest)])
    main()
    assert "<!DOCTYPE html>" in dest.read_text()
    monkeypatch.setattr(sys, "argv", ["moepress", "report", str(runs / "notes")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a moepress output" in err and err.count("\n") == 1


def test_report_renders_in_chromium(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    import matplotlib.image

    page = write_report(runs / "cd-moe-sr-2")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    colours = {tuple(c) for c in (pixels[::8, ::8].reshape(-1, 3) * 255).round().astype(int).tolist()}
    assert pixels.std() > 0.05 and len(colours) > 50  # text, tables and figures, not a blank page
