"""Light fine-tuning of condensed layers only (CD-MoE's lightweight expert fine-tuning)."""

from moepress.finetune.sft import SftData, load_sft, read_sft_pairs, tokenize_sft
from moepress.finetune.train import RECIPES, FinetuneResult, Recipe, finetune, load_train_ids, resolve_recipe
from moepress.finetune.trainable import condensed_modules, only_trainable

__all__ = [
    "RECIPES", "FinetuneResult", "Recipe", "SftData", "condensed_modules", "finetune", "load_sft", "load_train_ids",
    "only_trainable", "read_sft_pairs", "resolve_recipe", "tokenize_sft",
]
