"""Light fine-tuning of a condensed model: only the condensed layers learn, a token budget instead of
epochs, and an optional second stage of supervised fine-tuning on prompt/answer pairs.

Two recipes (`RECIPES`):
- `reference` (default), CD-MoE's (duterscmy/CD-MoE cd-moe/finetune/finetune.py): only the linear
  layers of the kept routed experts and shared experts train (a Qwen2-MoE sigmoid shared gate stays
  frozen, the reference has none), with the fixed routing weights as constants outside the
  down-projection (`moepress.finetune.parametrise`); AdamW with torch's defaults (betas 0.9/0.999,
  eps 1e-8, weight decay 0.01), lr 1e-5 decayed linearly to ~0 (`max(5e-6, 1 - step/steps)`), no
  warm-up, batches of 8 sequences of 256 tokens, gradient clipping at 1.0; a language-modelling stage
  and, given SFT pairs, a second stage with a fresh optimizer and schedule, one epoch over the pairs.
- `fast`, moepress' own: every parameter of the condensed MLPs (folded weights, shared gate
  included), AdamW (0.9, 0.95) without weight decay, lr 1e-4, linear warm-up then cosine decay to 10%.
Differences from the reference kept in both: packed text windows instead of padded documents in the
LM stage (no pad tokens in the loss), SFT loss on answer tokens only (`moepress.finetune.sft`), and
float32 master weights with bf16 autocast instead of training bf16 parameters: at lr 1e-5 an Adam step
is below half a bf16 ulp of any weight larger than ~2.5e-3, so bf16 parameters would drop most updates.

The loop is deliberately plain (nanoGPT-style), with optional gradient checkpointing for long
sequences. Perplexity on held-out ids is measured before and after with
`moepress.evaluate.perplexity`. The model is changed in place and returned; writing it is
`moepress.io.save_compressed(model, plan, out)`, as for any compressed model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.finetune.parametrise import unfolded
from moepress.finetune.sft import SftData
from moepress.finetune.trainable import condensed_modules, only_trainable
from moepress.plan import CompressionPlan, Condense
from moepress.progress import progress


@dataclass(frozen=True)
class Recipe:
    """How the condensed layers are trained (see the module docstring)."""

    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    schedule: str  # "linear": lr * max(5e-6, 1 - step/steps); "cosine": warm-up then cosine to 10%
    warmup_steps: int | None  # None: min(steps // 10, 100)
    max_grad_norm: float
    seq_len: int
    batch_size: int
    fixed_weights_outside: bool  # train D_e with w_e as a constant, not the folded column w_e * D_e
    train_shared_gate: bool

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {
    "reference": Recipe(
        name="reference", lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule="linear",
        warmup_steps=0, max_grad_norm=1.0, seq_len=256, batch_size=8, fixed_weights_outside=True,
        train_shared_gate=False,
    ),
    "fast": Recipe(
        name="fast", lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, schedule="cosine",
        warmup_steps=None, max_grad_norm=1.0, seq_len=512, batch_size=8, fixed_weights_outside=False,
        train_shared_gate=True,
    ),
}


def resolve_recipe(name: str = "reference", **overrides) -> Recipe:
    """The named recipe with every override that is not None applied."""
    if name not in RECIPES:
        raise MoepressError(f"unknown fine-tuning recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class FinetuneResult:
    """What a fine-tune did and what it bought."""

    layers: list[int]
    trainable_parameters: int
    steps: int
    tokens: int
    lr: float
    seconds: float
    recipe: str = "reference"
    hyperparameters: dict = field(default_factory=dict)  # the resolved Recipe
    ppl_before: float | None = None
    ppl_after: float | None = None
    losses: list[float] = field(default_factory=list)  # training loss per step (LM stage)
    sft_steps: int = 0
    sft_examples: int = 0
    sft_tokens: int = 0  # answer tokens in the loss, summed over the SFT stage
    sft_losses: list[float] = field(default_factory=list)
    ppl_after_lm: float | None = None  # between the stages, when there is an SFT stage

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(recipe: Recipe, step: int, steps: int, lr: float) -> float:
    """The learning rate of `step` (0-based) out of `steps` under `recipe`'s schedule."""
    if recipe.schedule == "linear":  # the reference's LambdaLR: max(min_lr=5e-6, 1 - progress), a multiplier
        warmup = recipe.warmup_steps or 0
        if step < warmup:
            return lr * step / warmup
        return lr * max(5e-6, 1.0 - (step - warmup) / max(1, steps - warmup))
    warmup = min(steps // 10, 100) if recipe.warmup_steps is None else recipe.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


def make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay
    )


def trainable_modules(modules: dict[int, nn.Module], recipe: Recipe) -> list[nn.Module]:
    """What the recipe trains in each condensed MLP: its three linears (the kept routed and shared
    experts' weights), plus the sigmoid shared gate under `fast`."""
    if recipe.train_shared_gate:
        return list(modules.values())
    return [lin for m in modules.values() for lin in (m.gate_proj, m.up_proj, m.down_proj)]


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


def _stage(
    model: nn.Module, params: list[nn.Parameter], recipe: Recipe, steps: int, batch: Callable[[int], dict],
    device: torch.device, autocast: bool, label: str,
) -> list[float]:
    """One training stage: a fresh optimizer and schedule over `steps` batches from `batch(step)`."""
    optimizer = make_optimizer(recipe, params)
    losses = []
    for step in progress(range(steps), label):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step, steps, recipe.lr)
        inputs = {k: v.to(device) for k, v in batch(step).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _cycling(n: int, batch_size: int, g: torch.Generator) -> Callable[[], torch.Tensor]:
    """Row indices for the next batch, cycling through seeded shuffles of `n` rows."""
    state = {"order": torch.randperm(n, generator=g), "cursor": 0}

    def take() -> torch.Tensor:
        if state["cursor"] + batch_size > n:
            state["order"], state["cursor"] = torch.randperm(n, generator=g), 0
        rows = state["order"][state["cursor"] : state["cursor"] + batch_size]
        state["cursor"] += batch_size
        return rows

    return take


def finetune(
    model: nn.Module,
    plan: CompressionPlan,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor | None = None,
    *,
    recipe: str | Recipe = "reference",
    tokens: int = 2_000_000,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    warmup_steps: int | None = None,
    max_grad_norm: float | None = None,
    sft: SftData | None = None,
    gradient_checkpointing: bool = False,
    autocast: bool | None = None,
    device: torch.device | str | None = None,
    eval_batch_size: int = 8,
    seed: int = 0,
) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune the layers `plan` condensed (after `apply_plan(model, plan)`) on `train_ids`, then
    on `sft` pairs when given.

    `recipe` is a name in `RECIPES` or a `Recipe`; `lr`, `batch_size`, `weight_decay`,
    `warmup_steps` and `max_grad_norm` override it when not None. `train_ids` are packed sequences
    [n, seq_len] (`moepress.data.load_tokens`); about `tokens` tokens are trained on, in batches of
    `batch_size` sequences, cycling through a seeded shuffle of the rows. `sft` (`load_sft`) adds one
    epoch over its pairs in batches of `batch_size`, with a fresh optimizer and schedule. `eval_ids`
    (held-out, never the training text) give perplexity before and after. `autocast=None` means bf16
    autocast on CUDA or when the trainable weights are not float32 (they train as float32 copies,
    cast back at the end), and none otherwise. Every parameter the recipe does not train is left
    bit-identical.
    """
    if isinstance(recipe, str):
        recipe = resolve_recipe(recipe)
    recipe = replace(recipe, **{k: v for k, v in dict(
        lr=lr, batch_size=batch_size, weight_decay=weight_decay, warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm).items() if v is not None})
    if train_ids.dim() != 2 or train_ids.shape[1] < 2:
        raise MoepressError(f"training ids must be [sequences, length >= 2]; got {tuple(train_ids.shape)}")
    if tokens < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise MoepressError(
            f"tokens, batch_size and lr must be positive (got {tokens}, {recipe.batch_size}, {recipe.lr})"
        )
    modules = condensed_modules(model, plan)
    actions = {i: plan.layers[i] for i in modules}
    assert all(isinstance(a, Condense) for a in actions.values())
    train = trainable_modules(modules, recipe)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    dtypes = {id(p): p.dtype for m in modules.values() for p in m.parameters()}
    if autocast is None:
        autocast = device.type == "cuda" or any(p.dtype != torch.float32 for m in train for p in m.parameters())
    lm_batch = min(recipe.batch_size, train_ids.shape[0])
    seq_len = train_ids.shape[1]
    steps = max(1, tokens // (lm_batch * seq_len))

    start = time.perf_counter()
    ppl_before = _ppl(model, eval_ids, eval_batch_size)
    ppl_after_lm = None
    if autocast:
        for m in modules.values():
            m.float()
    had_checkpointing = _checkpointing(model)
    was_training = model.training
    if gradient_checkpointing and not had_checkpointing:
        _set_checkpointing(model, True)
    g = torch.Generator().manual_seed(seed)
    sft_losses: list[float] = []
    sft_steps = sft_tokens = 0
    parametrised = unfolded(modules, actions) if recipe.fixed_weights_outside else nullcontext()
    try:
        with parametrised, only_trainable(model, train) as params:
            model.train()
            next_rows = _cycling(train_ids.shape[0], lm_batch, g)

            def lm(_step: int) -> dict:
                rows = train_ids[next_rows()]
                return {"input_ids": rows, "labels": rows}

            losses = _stage(model, params, recipe, steps, lm, device, autocast, "fine-tuning")
            if sft is not None and len(sft):
                if eval_ids is not None:
                    model.eval()
                    ppl_after_lm = _ppl(model, eval_ids, eval_batch_size)
                    model.train()
                order = torch.randperm(len(sft), generator=g)
                sft_batch = min(recipe.batch_size, len(sft))
                sft_steps = math.ceil(len(sft) / sft_batch)

                def pairs(step: int) -> dict:
                    rows = order[step * sft_batch : (step + 1) * sft_batch]
                    width = int(sft.attention_mask[rows].sum(1).max())  # trim the batch's common padding
                    return {
                        "input_ids": sft.input_ids[rows, :width], "labels": sft.labels[rows, :width],
                        "attention_mask": sft.attention_mask[rows, :width],
                    }

                sft_tokens = int((sft.labels[:, 1:] != -100).sum())
                sft_losses = _stage(model, params, recipe, sft_steps, pairs, device, autocast, "SFT")
            n_params = sum(p.numel() for p in params)
    finally:
        model.train(was_training)
        if gradient_checkpointing and not had_checkpointing:
            _set_checkpointing(model, False)
        # the with-block has exited: folded back (in float32 under autocast), now the stored dtype
        for m in modules.values():
            for p in m.parameters():
                p.data = p.data.to(dtypes[id(p)])
    ppl_after = _ppl(model, eval_ids, eval_batch_size)
    return model, FinetuneResult(
        layers=sorted(modules),
        trainable_parameters=n_params,
        steps=steps,
        tokens=steps * lm_batch * seq_len,
        lr=recipe.lr,
        seconds=time.perf_counter() - start,
        recipe=recipe.name,
        hyperparameters=recipe.to_dict(),
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        losses=losses,
        sft_steps=sft_steps,
        sft_examples=0 if sft is None else len(sft),
        sft_tokens=sft_tokens,
        sft_losses=sft_losses,
        ppl_after_lm=ppl_after_lm,
    )


def load_train_ids(
    tokenizer, source: str | Path, tokens: int, seq_len: int, seed: int = 0, text_field: str = "text"
) -> torch.Tensor:
    """Packed training sequences covering `tokens` from a .txt or .jsonl (`text_field`) file."""
    from moepress.data import load_tokens

    n = max(1, math.ceil(tokens / seq_len))
    return load_tokens(tokenizer, source, n, seq_len, seed, text_field).input_ids
