"""Light fine-tuning of a condensed model: next-token loss on local text, only the condensed layers
learn, a token budget instead of epochs.

The loop is deliberately plain (nanoGPT-style): AdamW on the condensed MLPs' parameters, linear
warm-up then cosine decay to 10% of `lr`, gradient clipping, bf16 autocast on CUDA (trainable
parameters kept in float32 while training, so small updates are not rounded away, and cast back to
the model's dtype at the end), optional gradient checkpointing for long sequences. Perplexity on
held-out ids is measured before and after with `moepress.evaluate.perplexity`. The model is changed
in place and returned; writing it is `moepress.io.save_compressed(model, plan, out)`, as for any
compressed model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.finetune.trainable import condensed_modules, only_trainable
from moepress.plan import CompressionPlan
from moepress.progress import progress


@dataclass
class FinetuneResult:
    """What a fine-tune did and what it bought."""

    layers: list[int]
    trainable_parameters: int
    steps: int
    tokens: int
    lr: float
    seconds: float
    ppl_before: float | None = None
    ppl_after: float | None = None
    losses: list[float] = field(default_factory=list)  # training loss per step

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


# transformers 5 renamed gradient checkpointing to activation checkpointing (old names warn)
def _checkpointing(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    new = hasattr(model, "activation_checkpointing_enable")
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif new:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _ppl(model: nn.Module, ids: torch.Tensor | None, batch_size: int) -> float | None:
    if ids is None:
        return None
    from moepress.evaluate.perplexity import perplexity

    return perplexity(model, ids, window=ids.shape[-1], batch_size=batch_size).ppl


def finetune(
    model: nn.Module,
    plan: CompressionPlan,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor | None = None,
    *,
    tokens: int = 2_000_000,
    lr: float = 1e-4,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    autocast: bool | None = None,
    device: torch.device | str | None = None,
    eval_batch_size: int = 8,
    seed: int = 0,
) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune the layers `plan` condensed (after `apply_plan(model, plan)`) on `train_ids`.

    `train_ids` are packed sequences [n, seq_len] (`moepress.data.load_tokens`); about `tokens`
    tokens are trained on, in batches of `batch_size` sequences, cycling through a seeded shuffle
    of the rows. `eval_ids` (held-out, never the training text) give perplexity before and after.
    `autocast=None` means bf16 autocast on CUDA and none on CPU. Every parameter outside the
    condensed MLPs is left bit-identical.
    """
    if train_ids.dim() != 2 or train_ids.shape[1] < 2:
        raise MoepressError(f"training ids must be [sequences, length >= 2]; got {tuple(train_ids.shape)}")
    if tokens < 1 or batch_size < 1 or lr <= 0:
        raise MoepressError(f"tokens, batch_size and lr must be positive (got {tokens}, {batch_size}, {lr})")
    modules = condensed_modules(model, plan)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    autocast = device.type == "cuda" if autocast is None else autocast
    batch_size = min(batch_size, train_ids.shape[0])
    seq_len = train_ids.shape[1]
    steps = max(1, tokens // (batch_size * seq_len))
    warmup = min(steps // 10, 100) if warmup_steps is None else warmup_steps

    start = time.perf_counter()
    ppl_before = _ppl(model, eval_ids, eval_batch_size)
    dtypes = {id(p): p.dtype for m in modules.values() for p in m.parameters()}
    if autocast:
        for m in modules.values():
            m.float()
    had_checkpointing = _checkpointing(model)
    was_training = model.training
    if gradient_checkpointing and not had_checkpointing:
        _set_checkpointing(model, True)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_ids.shape[0], generator=g)
    losses: list[float] = []
    try:
        with only_trainable(model, list(modules.values())) as params:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
            model.train()
            cursor = 0
            for step in progress(range(steps), "fine-tuning"):
                if cursor + batch_size > len(order):
                    order, cursor = torch.randperm(train_ids.shape[0], generator=g), 0
                batch = train_ids[order[cursor : cursor + batch_size]].to(device)
                cursor += batch_size
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, steps, warmup, lr)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            n_params = sum(p.numel() for p in params)
    finally:
        model.train(was_training)
        if gradient_checkpointing and not had_checkpointing:
            _set_checkpointing(model, False)
        for m in modules.values():
            for p in m.parameters():
                p.data = p.data.to(dtypes[id(p)])
    ppl_after = _ppl(model, eval_ids, eval_batch_size)
    return model, FinetuneResult(
        layers=sorted(modules),
        trainable_parameters=n_params,
        steps=steps,
        tokens=steps * batch_size * seq_len,
        lr=lr,
        seconds=time.perf_counter() - start,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        losses=losses,
    )


def load_train_ids(
    tokenizer, source: str | Path, tokens: int, seq_len: int, seed: int = 0, text_field: str = "text"
) -> torch.Tensor:
    """Packed training sequences covering `tokens` from a .txt or .jsonl (`text_field`) file."""
    from moepress.data import load_tokens

    n = max(1, math.ceil(tokens / seq_len))
    return load_tokens(tokenizer, source, n, seq_len, seed, text_field).input_ids
