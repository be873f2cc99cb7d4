"""Light fine-tuning of condensed layers only (CD-MoE's lightweight expert fine-tuning)."""

from moepress.finetune.train import FinetuneResult, finetune, load_train_ids
from moepress.finetune.trainable import condensed_modules, only_trainable

__all__ = ["FinetuneResult", "condensed_modules", "finetune", "load_train_ids", "only_trainable"]
