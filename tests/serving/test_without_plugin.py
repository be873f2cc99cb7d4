"""Without moepress's plugin, a vLLM that lacks expert substitution (0.32) must refuse a native-format
novice output rather than serve its uninitialised experts: the guard copy of one novice vector
(`moepress.modules.approximate.guard_name`) is a tensor it has no parameter for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moepress.serving.versions import has_native_substitution

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
DATA = MODELS.parent / "data" / "calib.txt"

SERVE = """
import sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    try:
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=2)
        llm.generate(["hello"], SamplingParams(max_tokens=2, temperature=0))
    except Exception as err:
        print("REFUSED", type(err).__name__, str(err).splitlines()[0][:300])
        sys.exit(3)
    print("SERVED")
"""


@pytest.mark.skipif(has_native_substitution(), reason="this vLLM serves approximate_experts itself")
def test_stock_vllm_refuses_a_native_output_without_the_plugin(tmp_path):
    import moepress

    if not (MODELS / "olmoe-mini" / "config.json").is_file():
        pytest.skip("olmoe-mini not present")
    out = moepress.compress(MODELS / "olmoe-mini", "mone", tmp_path / "out", data=DATA, ratio=0.25, n=8, seq_len=64)
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = dict(os.environ, VLLM_PLUGINS="none-but-stock")  # load no general plugin, moepress's included
    run = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    assert "moepress_novice_guard" in run.stdout
