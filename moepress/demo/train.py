"""The demo model: a small DeepSeek-V2-shaped MoE trained for a minute or two on CPU on the demo
grammar's text, cached so that only the first `moepress demo` pays for training.

Shape: 5 decoder layers (layer 0 dense, 4 MoE layers), hidden 96, MLA attention with 4 heads, 16
routed experts (intermediate 32) with top-2 softmax routing and 1 shared expert, a word-level vocabulary
of ~500 tokens. The routed experts hold most of the bytes, as in the real models, so compressing
them shows in the size. Training: AdamW with warm-up and cosine decay on random windows of the
training text, plus a Switch-style load-balancing loss (DeepSeek-V2 in transformers returns router
logits but computes no auxiliary loss) so that every expert is used and routing is not collapsed.
Its weight is small, 0.001 (DeepSeek-V2 used 0.003 for its expert-level balance loss), so that, as
in real MoE models, the experts' access frequencies follow the text rather than being flattened:
with the common 0.01 every expert of this model ends up with a near-equal share (most/least used
≈ 2× in every layer), which leaves frequency-based pruning nothing to go on; with 0.001 the ratio
is ≈ 3–20× while no expert is unused.

The cache folder is `$MOEPRESS_CACHE/demo/<key>` (default `~/.cache/moepress/demo/<key>`), where the
key hashes the model config, the grammar, the seed and the training settings; it holds the checkpoint,
its tokenizer, `train.txt` (training and calibration text), `heldout.txt` (another seed: evaluation
only) and `training.json`. It is written atomically, so an interrupted run leaves nothing half-done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moepress.atomic import atomic_dir
from moepress.demo import grammar
from moepress.progress import progress

TRAIN_FILE = "train.txt"
HELDOUT_FILE = "heldout.txt"
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights (with the model config and the grammar)."""

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    aux_loss_weight: float = 0.001
    train_words: int = 400_000
    heldout_words: int = 40_000
    seed: int = 0
    # model shape
    hidden_size: int = 96
    num_layers: int = 5
    experts: int = 16
    top_k: int = 2
    expert_intermediate: int = 32
    shared_experts: int = 1


QUICK = TrainSettings(steps=40, batch_size=8, seq_len=64, train_words=20_000, heldout_words=4_000,
                      hidden_size=64, num_layers=4)


def demo_config(s: TrainSettings, vocab_size: int):
    """The DeepSeek-V2 config of the demo model."""
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=4 * s.hidden_size,
        moe_intermediate_size=s.expert_intermediate,
        num_hidden_layers=s.num_layers,
        first_k_dense_replace=1,
        n_routed_experts=s.experts,
        num_experts_per_tok=s.top_k,
        n_shared_experts=s.shared_experts,
        num_attention_heads=4,
        num_key_value_heads=4,  # MLA expands k/v per head
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        max_position_embeddings=512,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg


def cache_root() -> Path:
    return Path(os.environ.get("MOEPRESS_CACHE", Path.home() / ".cache" / "moepress")).expanduser()


def cache_key(s: TrainSettings) -> str:
    cfg = demo_config(s, len(grammar.SPECIALS) + len(grammar.vocabulary())).to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
    spec = {"config": cfg, "grammar": grammar.fingerprint(), "train": asdict(s), "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, mean over MoE layers: E · Σ_e f_e · P_e, where f_e is the
    share of routed slots sent to expert e and P_e its mean router probability (1 when balanced)."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        share = F.one_hot(chosen, probs.shape[-1]).sum(1).float().mean(0) / top_k
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@contextmanager
def recorded_router_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Each MoE layer's router logits of one forward, in layer order: what `output_router_logits` returns
    where the model records them (DeepSeek-V2 does from transformers 5.19 on)."""
    recorded: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _args, out: recorded.append(out[0]))
        for m in model.modules()
        if type(m).__name__.endswith("TopkRouter")
    ]
    try:
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: the demo model's matmuls are too small to gain from more, and a busy
    machine makes several threads much slower; it also makes training bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@single_thread()
def train(s: TrainSettings, ids: torch.Tensor, vocab_size: int, log=None):
    """A freshly initialised demo model trained on the 1-D token stream `ids`; (model, history)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(demo_config(s, vocab_size), dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        t = (step - s.warmup) / max(1, s.steps - s.warmup)
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(s.seed)
    history = []
    start = time.perf_counter()
    for step in progress(range(s.steps), "training the demo model"):
        starts = torch.randint(0, len(ids) - s.seq_len - 1, (s.batch_size,), generator=g)
        batch = torch.stack([ids[i : i + s.seq_len] for i in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with recorded_router_logits(model) as recorded:
            out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        aux = load_balancing_loss(getattr(out, "router_logits", None) or recorded, s.top_k)
        loss = out.loss + s.aux_loss_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == s.steps - 1:
            history.append({"step": step, "loss": out.loss.item(), "aux": aux.item()})
            if log is not None:
                log(step, out.loss.item(), aux.item())
    model.eval()
    return model, {"history": history, "seconds": time.perf_counter() - start}


@dataclass
class DemoModel:
    """Where the trained demo model and its text are, and whether this call trained it."""

    path: Path
    trained: bool

    @property
    def train_text(self) -> Path:
        return self.path / TRAIN_FILE

    @property
    def heldout_text(self) -> Path:
        return self.path / HELDOUT_FILE


def ensure_demo_model(s: TrainSettings = TrainSettings(), log=None) -> DemoModel:
    """The cached demo model for `s`, training (and caching) it first when it is not there yet."""
    folder = cache_root() / "demo" / cache_key(s)
    if (folder / TRAINING_FILE).is_file():
        return DemoModel(folder, trained=False)
    tokenizer = grammar.word_tokenizer()
    train_text = grammar.corpus(s.train_words, seed=s.seed)
    heldout_text = grammar.corpus(s.heldout_words, seed=s.seed + 1_000_003)
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    model, record = train(s, ids, len(tokenizer), log=log)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_FILE).write_text(train_text)
        (tmp / HELDOUT_FILE).write_text(heldout_text)
        record.update(settings=asdict(s), grammar=grammar.fingerprint(), tokens=len(ids))
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return DemoModel(folder, trained=True)
