"""Calibrated against data-free int4 (`--quantize gptq-w4a16` / `awq-w4a16` against `w4a16`) on a pruned
mini checkpoint: dev perplexity, JS divergence to the float prune, the logits' relative distance to it,
stored bytes and seconds per scheme.

The float prune is written once (`moepress.compress(MINI, METHOD, ratio=R)`), copied once per scheme and
quantised in place by `moepress.quant.export.quantize_folder` with the same calibration tokens `moepress
compress --quantize` passes (N × SEQ of calib.txt); every output is read back with plain
`AutoModelForCausalLM` and measured on 512-token windows of dev.txt (never calibration text). Needs
llm-compressor (`pip install 'moepress[gptq]'`); AWQ needs a GPU.

    python bench/calibrated_quant.py --models olmoe-mini --schemes w4a16,gptq-w4a16            # CPU
    python bench/calibrated_quant.py --device cuda --schemes w4a16,gptq-w4a16,awq-w4a16        # GPU

Writes bench/results/calibrated_quant_<model>_<where>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import MODELS, ROOT, SHARED, dev_logits, environment, measure, reference_measure

from moepress.data.text import load_tokens
from moepress.quant.export import quantize_folder


def stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def load_plain(folder: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def run_model(name: str, args, work: Path, save=lambda result: None) -> dict:
    """Every scheme on one mini; `save(result)` after each row, so a run cut short keeps its rows."""
    import moepress

    device = torch.device(args.device)
    float_out = Path(moepress.compress(args.models_dir / name, args.method, work / f"{name}-float",
                                       data=args.data_dir / "calib.txt", ratio=args.ratio, n=args.n,
                                       seq_len=args.seq_len))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(float_out)
    calibration = load_tokens(tokenizer, args.data_dir / "calib.txt", args.n, args.seq_len).input_ids
    dev = load_tokens(tokenizer, args.data_dir / "dev.txt", args.eval_rows, args.eval_len).input_ids
    model = load_plain(float_out, device)
    reference = dev_logits(model, dev, args.batch_size, device)
    rows = [{"scheme": "float (bf16)", **reference_measure(dev, reference, args.batch_size),
             "stored_bytes": stored_bytes(float_out), "seconds": None}]
    del model
    result = {"model": name, "method": args.method, "ratio": args.ratio, "rows": rows}
    save(result)
    for scheme in args.schemes:
        out = shutil.copytree(float_out, work / f"{name}-{scheme}")
        start = time.perf_counter()
        try:
            quantize_folder(out, scheme, calibration=calibration)
        except Exception as err:  # noqa: BLE001 - one scheme failing keeps the others' rows
            rows.append({"scheme": scheme, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            print(f"{name} {scheme}: {rows[-1]['error']}", flush=True)
            save(result)
            continue
        seconds = time.perf_counter() - start
        model = load_plain(out, device)
        m = measure(model, dev, reference, args.batch_size, device)
        del model
        rows.append({"scheme": scheme, **m, "stored_bytes": stored_bytes(out), "seconds": seconds})
        print(f"{name} {scheme}: ppl {m['ppl']:.2f}, JS {m['js']:.5f}, logits {rows[-1]['logit_distance']:.4f}, "
              f"{rows[-1]['stored_bytes'] / 2**20:.1f} MiB, {seconds:.0f} s", flush=True)
        save(result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--schemes", default="w4a16,gptq-w4a16")
    ap.add_argument("--method", default="frequency")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("-n", type=int, default=128, help="calibration sequences (prune and quantiser)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--models-dir", type=Path, default=SHARED / "models")
    ap.add_argument("--data-dir", type=Path, default=SHARED / "data")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.schemes = [s for s in args.schemes.split(",") if s]
    device = torch.device(args.device)
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower()
    where = next((t for t in ("h200", "h100", "a100", "l40", "cpu") if t in name), name.split()[-1])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for name in args.models.split(","):
        path = args.out_dir / f"calibrated_quant_{name}_{where}.json"

        def save(result: dict, path: Path = path) -> None:
            path.write_text(json.dumps({**environment(device), "config": config, **result}, indent=1) + "\n")

        with tempfile.TemporaryDirectory() as work:
            run_model(name, args, Path(work), save)
        print(f"-> {path}", flush=True)


if __name__ == "__main__":
    main()
