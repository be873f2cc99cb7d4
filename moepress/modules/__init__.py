"""The nn.Modules of compressed checkpoints; all live in one self-contained file (`compressed.py`)
because that file is copied next to the weights as remote code."""

from moepress.modules.compressed import (
    STRUCTURE_VERSION,
    CondensedMLP,
    ConstantExpert,
    DroppedMLP,
    MappedExperts,
    NoviceExperts,
    apply_structure,
    build_layer,
)

__all__ = [
    "STRUCTURE_VERSION",
    "CondensedMLP",
    "ConstantExpert",
    "DroppedMLP",
    "MappedExperts",
    "NoviceExperts",
    "apply_structure",
    "build_layer",
]
