"""Outputs that are plain checkpoints of the source architecture convert to GGUF with llama.cpp's own
converter and run in llama.cpp with the greedy tokens of `moepress.load` (float32, 16 new tokens, 3
prompts), up to a step where transformers' two best candidates are within float32 rounding of a tie.

Needs llama-cpp-python and llama.cpp's `convert_hf_to_gguf.py` (its sdist's `vendor/llama.cpp`, named by
MOEPRESS_GGUF_CONVERTER): CI's third stage builds both; elsewhere these tests skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA, mini_model_path
from tests.serving.helpers import CALIB, NEW_TOKENS, assert_same_greedy, prompt_ids, transformers_greedy

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built in CI's third stage only")
CONVERTER = Path(os.environ.get("MOEPRESS_GGUF_CONVERTER", "/nonexistent"))
if not CONVERTER.is_file():
    pytest.skip("MOEPRESS_GGUF_CONVERTER names no convert_hf_to_gguf.py", allow_module_level=True)


#: llama.cpp's converter names a BPE tokenizer's pre-tokenizer by a hash of how it splits a probe text, and
#: refuses one it does not know: the minis' own tokenizers (trained here) are unknown to it. The tests feed
#: llama.cpp token ids, never text, so the pre-tokenizer plays no part: name GPT-2's and convert.
CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1].rpartition('/')[0])
from conversion import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
converter, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_path(converter, run_name='__main__')
"""


def to_gguf(folder: Path, out: Path) -> Path:
    """llama.cpp's converter, float32 (no quantisation: the comparison is of the architecture)."""
    done = subprocess.run([sys.executable, "-c", CONVERT, str(CONVERTER), str(folder), "--outtype", "f32",
                           "--outfile", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def llama_greedy(gguf: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, seed=0, verbose=False)
    out = []
    for prompt in prompts:
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if len(tokens) == NEW_TOKENS:
                break
        out.append(tokens)
    del llm
    return out


# not dsv2-mini: llama.cpp (0.3.36's vendored copy) takes a DeepSeek-V2 without q_lora_rank only at
# DeepSeek-V2-Lite's 27 layers, so the original dsv2-mini does not load there either
@pytest.mark.parametrize("mini", ["qwen2moe-mini", "olmoe-mini"])
def test_uniform_prune_runs_in_llama_cpp(tmp_path, mini):
    import moepress

    out = moepress.compress(mini_model_path(mini), "frequency", tmp_path / "out", data=DATA / "calib.txt",
                            ratio=0.25, **CALIB)
    prompts = prompt_ids(out)
    got = llama_greedy(to_gguf(out, tmp_path / "model.gguf"), prompts)
    assert_same_greedy(out, prompts, got, transformers_greedy(out, prompts), engine="llama.cpp", rel_tol=1e-3)


def test_dense_layers_are_refused_by_the_converter(tmp_path):
    """A layer-drop (or CD-MoE) output that is a plain Qwen2-MoE checkpoint keeps its dense layers in
    `mlp_only_layers`; llama.cpp's converter maps no dense MLP tensor of a Qwen2/3-MoE (the original tiny
    Qwen3-MoE with `mlp_only_layers=[0]` fails the same way), so these outputs have no GGUF form. This test
    fails once a converter takes them: then the README's GGUF column can say yes."""
    import moepress

    out = moepress.compress(mini_model_path("qwen2moe-mini"), "layer-drop", tmp_path / "out",
                            data=DATA / "calib.txt", layers=2, **CALIB)
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"]  # plain, with dense layers
    done = subprocess.run([sys.executable, "-c", CONVERT, str(CONVERTER), str(out), "--outtype", "f32",
                           "--outfile", str(tmp_path / "model.gguf")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Can not map tensor 'model.layers." in done.stderr and ".mlp.down_proj.weight'" in done.stderr
