"""Kolibri-1.1 (`kolibri1_1`).

The MoE block is Kolibri-1's (`Kolibri1_1SparseMoeBlock` subclasses it unchanged), so the routing and
block are `moepress.models.kolibri`'s: top-k on the raw float32 logits plus `e_score_correction_bias`,
weights = sigmoid of the chosen logits, renormalised when `norm_topk_prob`; one ungated shared expert.
What differs is outside the block:
- dense layers are those in `mlp_only_layers` (a `Kolibri1_1MLP` of `mlp_only_intermediate_size` rows);
- sliding-window layers and indexed (sparse, NoPE) attention layers; an indexer layer (`index_layers`)
  selects a pool of candidate keys that the following indexed layers rescore: the decoder layer returns
  `(hidden, index_pool)` and the model's loop hands `index_pool` to the next layer (`carried`);
- indexed layers may read another layer's keys and values (`kv_source_layers`) through the per-forward
  `shared_kv_states` object, which layer-by-layer runs record once per batch and hand to every layer.
The tiny model has all of these: layer 0 sliding and dense, layer 1 an indexer storing its K/V, layer 2 a
reindexer reading layer 1's K/V, with a key budget below the test sequences' length so selection happens.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.kolibri import KolibriBlock, kolibri_routing

declare(
    Family(
        name="kolibri1_1",
        since="5.25",
        model_types=("kolibri1_1",),
        routing=kolibri_routing,
        shared="shared_experts",
        correction_bias="e_score_correction_bias",
        block_cls=KolibriBlock,
        carried={"index_pool": 1},
        tiny=dict(
            head_dim=16,  # NVFP4 rounding of keys and values needs a multiple of 16
            layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
            sliding_window=4,
            mlp_only_layers=[0],
            mlp_only_intermediate_size=64,
            index_layers=[1],
            kv_source_layers=[0, 1, 1],
            index_num_heads=2,
            index_topk=2,
            index_pool_size=4,
            index_compression=2,
            index_num_local_tokens=1,
            index_num_sink_tokens=1,
        ),
    )
)
