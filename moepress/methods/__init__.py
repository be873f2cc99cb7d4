"""Expert-pruning methods: statistics (and, for search, the MoE blocks) in, CompressionPlan out.

`get_method(name)(stats, ratio, seed=..., blocks=..., moe_inputs=..., **hyperparameters)` runs one;
`available_methods()` lists them (mone; the paper's ablations mone-zero-novice, mone-variance,
mone-frequency and baseline rs; moepress's variants variance and frequency+novice; and the baselines
frequency, random, reap, naee). The search methods (cd-moe-s, cd-moe-sr, layer-drop) are in
`methods.search_registry`.

Importing this package registers every method: the registries (`base`, `search_registry`) import no
method; each method file registers itself when imported, and the imports below load them all, once.
"""

from moepress.methods import (  # noqa: F401 - importing a method file registers its methods
    cd_moe,
    frequency,
    hc_smoe,
    m_smoe,
    mone,
    mone_ablations,
    naee,
    random_prune,
    ream,
    reap,
    rs,
)
from moepress.methods.base import (
    Selection,
    available_methods,
    experts_to_prune,
    get_method,
    register_method,
)

__all__ = ["Selection", "available_methods", "experts_to_prune", "get_method", "register_method"]
