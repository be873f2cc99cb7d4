"""Checkpoints for the serving tests, and greedy decoding in vLLM and in transformers."""

from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NEW_TOKENS = 16
PROMPTS = (
    "The history of the city begins",
    "In mathematics, a group is",
    "She opened the door and",
)
# small calibration: these tests check serving, not compression quality
CALIB = dict(n=8, seq_len=64, overwrite=True)


def prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(p).input_ids for p in PROMPTS]


def vllm_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """vLLM's greedy continuation of each prompt, float32 on CPU (the engine is freed before returning)."""
    from vllm import LLM, SamplingParams

    mla = "kv_lora_rank" in json.loads((folder / "config.json").read_text())
    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        disable_log_stats=True,
        seed=0,
        # where the CPU has AMX vLLM picks its AMX MLA kernels, and those take bf16 only
        **({"attention_backend": "CPU_MLA"} if mla else {}),
    )
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()


def transformers_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """`moepress.load`'s greedy continuation of each prompt, float32."""
    import moepress

    model = moepress.load(folder, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            out.append(ids[0, len(p) :].tolist())
    return out


def assert_same_greedy(folder: Path, prompts: list[list[int]], got: list[list[int]], want: list[list[int]],
                       engine: str = "vLLM", rel_tol: float = 1e-4) -> None:
    """An engine's tokens `got` equal transformers' `want`, except after a step where transformers' two candidates
    tie to float32 rounding, within `rel_tol` of the largest logit (random tiny models have such steps; there
    either answer is right)."""
    import moepress

    if got == want:
        return
    model = moepress.load(folder, dtype=torch.float32)
    for prompt, g, w in zip(prompts, got, want, strict=True):
        if g == w:
            continue
        i = next(j for j, (a, b) in enumerate(zip(g, w, strict=True)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + w[:i]])).logits[0, -1]
        gap = (logits[w[i]] - logits[g[i]]).abs().item()
        assert gap <= rel_tol * logits.abs().max().item(), (
            f"{engine} {g} != transformers {w} (step {i}, logit gap {gap:.3g})")


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


def num_experts(config: dict) -> int:
    return next(config[k] for k in EXPERT_COUNT_KEYS if k in config)


def write_native(source: Path, out: Path, layers: tuple[int, ...] = (1, 3), drop_value: bool = False) -> Path:
    """vLLM's native MoNE format written by hand from a plain checkpoint: a quarter of the experts of `layers`
    become novices (`approximate_experts`, `<experts>.<id>.approx_value`), the rest keep their ids.
    `drop_value`: leave one approx_value out (a broken checkpoint)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = json.loads((source / "config.json").read_text())
    n = num_experts(config)
    g = torch.Generator().manual_seed(0)
    novices = {str(i): sorted(torch.randperm(n, generator=g)[: n // 4].tolist()) for i in layers}
    config["approximate_experts"] = novices
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(source / "model.safetensors")
    dtype = tensors["model.embed_tokens.weight"].dtype
    kept, prefix = {}, {}
    for name, t in tensors.items():
        match = _EXPERT.match(name)
        if match and int(match[2]) in novices.get(match[1], ()):
            prefix[match[1]] = name[: match.start(2) - 1]  # ...experts
            continue
        kept[name] = t
    for layer, ids in novices.items():
        for e in ids:
            vector = 0.05 * torch.randn(config["hidden_size"], generator=g)
            kept[f"{prefix[layer]}.{e}.approx_value"] = vector.to(dtype)
    if drop_value:
        kept.pop(next(k for k in kept if k.endswith("approx_value")))
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_layer_counts(source: Path, out: Path, novices: bool = False) -> Path:
    """A per-layer expert count: layer 1 keeps three quarters of its router rows, layer 3 half, the rest all.
    `novices`: a quarter of layer 1's rows are novices (fewer router rows and novices: moepress's own format)."""
    from moepress.compression import apply
    from moepress.plan import CompressionPlan, Prune

    n = num_experts(json.loads((source / "config.json").read_text()))
    layer1 = Prune(keep_experts=[e for e in range(n) if e % 4 < (2 if novices else 3)])
    if novices:
        layer1 = Prune(keep_experts=layer1.keep_experts, novices=[e for e in range(n) if e % 4 == 2])
    plan = CompressionPlan(method="manual", layers={1: layer1, 3: Prune(keep_experts=list(range(1, n, 2)))})
    g = torch.Generator().manual_seed(1)
    hidden = json.loads((source / "config.json").read_text())["hidden_size"]
    for e in layer1.novices:
        plan.set_novice(1, e, 0.05 * torch.randn(hidden, generator=g))
    plan_file = out.with_suffix(".plan.json")
    plan.save(plan_file)
    return Path(apply(source, plan_file, out, overwrite=True))


# tiny random models of the families without a bundled mini: sizes vLLM's CPU attention takes (head size
# 64), the vocabulary of the bundled minis' tokenizer (copied next to the weights)
TINY_SIZES = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=8192,
    num_hidden_layers=4,
    max_position_embeddings=1024,
)


def write_tiny(family: str, out: Path, tokenizer_from: Path, **overrides) -> Path:
    """A random tiny model of `family` (moepress.testing's, at `TINY_SIZES`) saved as a checkpoint folder."""
    from moepress.testing import tiny_model

    model = tiny_model(family, **{**TINY_SIZES, **overrides})
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_from / name, out / name)
    return out
