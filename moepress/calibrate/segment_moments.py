"""Shifted first and second moments of consecutive row segments in one read of the rows.

Calibration's statistics need, per expert e, Σ y and Σ (y − ȳ)² over the rows routed to e (sorted
into one segment per expert). Done with torch ops on half-precision outputs, that is a float32 copy
of every row, two segment sums, a broadcast of the means and a square: about seven passes over
[S, H] float32, the largest cost of a fused calibration step on a GPU after the expert GEMMs. The
Triton kernel here reads each bf16/fp16 row once and accumulates, per (expert, column block), in
float32 registers: Σ d and Σ d² with d = y − shift[e].

The shift keeps the second moment free of cancellation: with shift ≈ ȳ (the running mean of the
batches before, or the segment's first row on the first batch), Σ d² − (Σ d)²/n loses no digits to
a large mean. `segment_moments` is the same computation in torch ops: the CPU path, and the
reference the kernel is tested against (`tests/test_calibrate_fast.py`, on the GPU or under
`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU builds go without (and need no kernel)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None


def segment_moments(values: torch.Tensor, counts: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ d, Σ d²) per segment [E, H] float32, d = values − shift[segment] in float32.

    `values` [S, H] holds `counts[e]` consecutive rows per segment e (Σ counts = S), `shift` is [E, H]."""
    if use_kernel(values):
        return _segment_moments_triton(values, counts, shift)
    return segment_moments_reference(values, counts, shift)


def use_kernel(values: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for `values`: a GPU tensor (or Triton's CPU interpreter) with
    Triton importable."""
    if triton is None or values.ndim != 2 or values.shape[0] == 0:
        return False
    return values.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and values.device.type == "cpu")


def segment_moments_reference(values: torch.Tensor, counts: torch.Tensor,
                              shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_moments` in torch ops (float32)."""
    d = values.float() - shift.float().repeat_interleave(counts, dim=0, output_size=values.shape[0])
    total = torch.segment_reduce(torch.cat([d, d.square()], dim=-1), "sum", lengths=counts, axis=0, unsafe=True)
    return total[:, : values.shape[1]], total[:, values.shape[1] :]


if triton is not None:

    @triton.jit
    def _segment_moments_kernel(values, starts, shift, out_sum, out_sq, hidden, row_stride,
                                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        segment = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = cols < hidden
        begin = tl.load(starts + segment)
        end = tl.load(starts + segment + 1)
        c = tl.load(shift + segment * hidden + cols, mask=col_ok, other=0.0)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        for first in range(begin, end, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            ok = (rows < end)[:, None] & col_ok[None, :]
            y = tl.load(values + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
            d = tl.where(ok, y.to(tl.float32) - c[None, :], 0.0)
            acc += d
            acc_sq += d * d
        tl.store(out_sum + segment * hidden + cols, tl.sum(acc, axis=0), mask=col_ok)
        tl.store(out_sq + segment * hidden + cols, tl.sum(acc_sq, axis=0), mask=col_ok)


def _segment_moments_triton(values: torch.Tensor, counts: torch.Tensor,
                            shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    segments, hidden = counts.shape[0], values.shape[1]
    if values.stride(1) != 1:
        values = values.contiguous()
    starts = torch.zeros(segments + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=starts[1:])
    shift = shift.to(device=values.device, dtype=torch.float32).contiguous()
    out_sum = torch.empty(segments, hidden, dtype=torch.float32, device=values.device)
    out_sq = torch.empty_like(out_sum)
    block_cols = 64
    grid = (segments, triton.cdiv(hidden, block_cols))
    _segment_moments_kernel[grid](values, starts, shift, out_sum, out_sq, hidden, values.stride(0),
                                  BLOCK_ROWS=32, BLOCK_COLS=block_cols)
    return out_sum, out_sq
