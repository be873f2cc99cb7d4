"""Read a moepress output in vLLM's native novice format with vLLM >= 0.33's OWN parser functions.

vLLM's GPU wheel does not import on a CPU-only machine, but the parts that read the format
(`_parse_approximate_experts`, `decoder_layer_index`, `_parse_approx_value_name`) are plain Python:
this script executes exactly those definitions from an unpacked wheel and checks a folder with them.

    pip download vllm==0.33.0 --no-deps -d /tmp/w && unzip -q /tmp/w/vllm-*.whl 'vllm/*' -d /tmp/w
    python bench/vllm_native_format_check.py /tmp/w OUT_FOLDER
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from safetensors import safe_open

PARSERS = {
    "vllm/model_executor/layers/fused_moe/expert_substitution.py": {
        "APPROX_VALUE_SUFFIX",
        "decoder_layer_index",
        "ExpertSubstitutionSpec",
        "_expert_ids",
        "_parse_approximate_experts",
    },
    "vllm/model_executor/models/expert_substitution.py": {"_parse_approx_value_name"},
}


def vllm_parsers(root: Path) -> dict:
    """The named top-level definitions of vLLM's expert-substitution files, executed on their own."""
    ns: dict = {}
    exec("from collections.abc import Mapping\nfrom dataclasses import dataclass, field\nfrom typing import Any\n", ns)
    for rel, names in PARSERS.items():
        path = root / rel
        for node in ast.parse(path.read_text()).body:
            name = getattr(node, "name", None)
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
            if name in names:
                exec(compile(ast.Module([node], []), str(path), "exec"), ns)
    return ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vllm_root", type=Path, help="folder holding an unpacked vllm/ package (>= 0.33)")
    parser.add_argument("folder", type=Path, help="a moepress output with approximate_experts")
    args = parser.parse_args()
    ns = vllm_parsers(args.vllm_root)
    config = json.loads((args.folder / "config.json").read_text())
    spec = ns["_parse_approximate_experts"](config["approximate_experts"])
    keys: list[str] = []
    for shard in sorted(args.folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    parsed = {ns["_parse_approx_value_name"](k) for k in keys if k.endswith(".approx_value")}
    wanted = {(layer, e) for layer, ids in spec.experts.items() for e in ids}
    print(f"model_type {config['model_type']}, {len(spec.experts)} layers, {len(wanted)} novices")
    print(f"approx_value names parsed by vLLM == approximate_experts: {parsed == wanted}")
    if parsed != wanted:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
