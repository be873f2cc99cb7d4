"""The `moepress` command line: thin wrappers over the Python API, one-line errors, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moepress.errors import MoepressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ModelArg = Annotated[str, typer.Argument(help="Hugging Face checkpoint folder (or hub id when online)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the checkpoint's own code")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="allow .bin weights (weights_only)")]


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


@app.command()
def inspect(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Family, layers, MoE layers, experts, shared experts, routing, parameters and bytes by component."""
    from moepress.inspect import summarize
    from moepress.models.loading import load_model

    m, _ = load_model(model, dtype="auto", device="cpu", trust_remote_code=trust_remote_code)
    s = summarize(m)
    if json_out:
        print(json.dumps(s.to_dict(), indent=1))
        return
    console.print(f"[bold]{model}[/bold]: family [cyan]{s.family}[/cyan], {s.num_layers} layers, "
                  f"MoE layers {s.moe_layers}")
    console.print(f"routed experts {s.routed_experts} (intermediate {s.expert_intermediate}), top-{s.top_k}, "
                  f"{s.scoring} scoring, renormalise top-k: {s.norm_topk}, scaling {s.routed_scaling}, "
                  f"group-limited: {s.group_limited}; shared-expert rows {s.shared_intermediate}")
    table = Table("component", "parameters", "bytes")
    for c, n in s.parameters.items():
        table.add_row(c, f"{n:,}", _gib(s.bytes[c]))
    console.print(table)


@app.command()
def calibrate(
    model: ModelArg,
    data: Annotated[str, typer.Option(help=".txt/.jsonl/.parquet file or HF dataset name")],
    out: Annotated[Path, typer.Option("-o", "--out", help="statistics folder to write")],
    n: Annotated[int, typer.Option("-n", help="number of calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    seed: int = 0,
    batch_size: int = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: bool = False,
    trust_remote_code: RemoteOpt = False,
    stream: Annotated[bool, typer.Option(help="read one layer at a time from the shards")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from OUT.partial/")] = False,
) -> None:
    """Collect per-expert statistics layer by layer; writes stats.safetensors + stats.json.

    Several GPUs: `torchrun --nproc-per-node G -m moepress calibrate ...` splits the sequences.
    """
    from moepress.pipeline import run_calibration

    result = run_calibration(
        model, data, n=n, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
        out=out, overwrite=overwrite, trust_remote_code=trust_remote_code, stream=stream, resume=resume,
    )
    from moepress.calibrate.distributed import world

    if world()[0] != 0:
        return
    s = result.stats
    console.print(f"calibrated {len(s.layers)} MoE layers on {s.meta['num_sequences']}×{s.meta['seq_len']} "
                  f"tokens (data {s.meta.get('data_fingerprint')}) → {out}")
    table = Table("layer", "dead experts", "min freq", "max freq", "mean var")
    for i, ls in sorted(s.layers.items()):
        table.add_row(str(i), str(int((ls.count == 0).sum())), f"{ls.frequency.min():.4f}",
                      f"{ls.frequency.max():.4f}", f"{ls.output_variance.mean():.3e}")
    console.print(table)


@app.command("demo-model")
def demo_model(
    out: Annotated[Path, typer.Option("-o", "--out", help="folder to write")] = Path("tiny"),
    family: str = "deepseek_v2",
    overwrite: bool = False,
) -> None:
    """Write a tiny random-initialised MoE checkpoint (no download), for trying the tool."""
    from moepress.pipeline import write_demo_model

    write_demo_model(out, family=family, overwrite=overwrite)
    console.print(f"wrote a tiny {family} checkpoint to {out}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except MoepressError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except (typer.Exit, SystemExit) as err:
        code = getattr(err, "exit_code", getattr(err, "code", 0))
        sys.exit(code)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(2)
        if isinstance(err, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
