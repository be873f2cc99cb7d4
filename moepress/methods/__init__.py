"""Expert-pruning methods: statistics (and, for search, the MoE blocks) in, CompressionPlan out.

`get_method(name)(stats, ratio, seed=..., blocks=..., moe_inputs=..., **hyperparameters)` runs one;
`available_methods()` lists them (mone; the paper's ablations mone-zero-novice, mone-variance,
mone-frequency and baseline rs; moepress's variants variance and frequency+novice; and the baselines
frequency, random, reap, naee).
"""

from moepress.methods.base import (
    Selection,
    available_methods,
    experts_to_prune,
    get_method,
    register_method,
)

__all__ = ["Selection", "available_methods", "experts_to_prune", "get_method", "register_method"]
