"""DeepSeek-V4 (`deepseek_v4`: V4-Flash, V4-Pro) in transformers v5.

Quirks spelled out here:
- Every decoder layer has an MoE block `mlp` (router `gate`, fused experts `experts`, one always-on
  ungated shared MLP `shared_experts`); `mlp_layer_types` says per layer whether it is score-routed
  (`"moe"`) or hash-routed (`"hash_moe"`, the first 3 layers by default).
- Score-routed layers (`DeepseekV4TopKRouter`): logits in the activations' dtype (no float32 cast),
  scores = `scoring_func` of the logits (`sqrtsoftplus` = sqrt(softplus(x)) by default; sigmoid or
  softmax allowed), `e_score_correction_bias` (float32) added for the CHOICE only, top-k, weights =
  the unbiased scores of the chosen experts ALWAYS renormalised (+1e-20, `norm_topk_prob` is
  ignored), times `routed_scaling_factor`; all in the router's dtype. No group-limited choice.
  sqrtsoftplus and sigmoid act per expert, so a pruned router scores its kept experts unchanged.
- Hash-routed layers (`DeepseekV4HashRouter`): the experts come from a frozen token-id table
  (`gate.tid2eid[input_ids]`, [vocab, k]); the learned gate only weights them. The block needs the
  token ids (the decoder layer passes `input_ids`), which the expert view (hidden states only) cannot
  see, and pruning them would need the table renumbered and a place for tokens hashed to a removed
  expert. These layers are therefore left out of the expert view (`unviewed_moe_layers`): every
  method keeps them exactly as they are, and a plan that changes one is refused with that reason.
  Since they keep all `n_routed_experts` experts, pruning the score-routed layers is never
  expressible in the plain architecture (the config's one count sizes both kinds of layer): the
  checkpoint carries `moepress_structure` and loads through `moepress.load` / `trust_remote_code`.
- Routed experts and the shared MLP use a clamped SwiGLU (gate clamped from above and up to
  ±`swiglu_limit`, `DeepseekV4Experts._apply_gate`); `TransformersExperts` runs the experts module
  itself, so condensing keeps the experts class (`CondensedExperts`) and the shared MLP as it is.
- Decoder layers carry `hc_mult` hyper-connection streams; the block sees the collapsed, normalised
  stream. A dropped block outputs zeros; the streams' own mixing stays. Before the LM head the
  streams collapse (`model.hc_head`), then `model.norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from moepress.models.base import MoEBlock, RouteResult, Routing
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family, register_adapter

HASH_REFUSAL = (
    "DeepSeek-V4 picks this layer's experts by token id (a frozen tid2eid table), which the expert view "
    "cannot see; it is kept as it is"
)


def deepseek_v4_routing(router, config) -> Routing:
    """`DeepseekV4TopKRouter`'s rule (the scoring itself is `DeepseekV4Block.route`'s)."""
    return Routing(
        scoring=getattr(config, "scoring_func", "sqrtsoftplus"),
        top_k=router.top_k,
        norm_topk=True,
        scaling=float(router.routed_scaling_factor),
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
        norm_eps=1e-20,
    )


class DeepseekV4Block(MoEBlock):
    """A score-routed layer: scores by the router's own `score_fn` (sqrtsoftplus by default), in the
    router's dtype as the family computes them, over the active experts' logits only."""

    ignored_call_arguments = ("input_ids",)  # the decoder layer passes them; only hash-routed layers read them

    def route(self, x, active=None, logits=None) -> RouteResult:
        r = self.routing
        logits, ids, bias = self.active_logits(x, active, logits)
        dtype = self.router_weight.dtype
        # logits were computed in `dtype` and cast to float32 exactly: back in `dtype`, the family's op order
        scores = self.router.score_fn(logits.to(dtype))
        choice = scores if bias is None else scores + bias
        local = torch.topk(choice, r.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, local)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + r.norm_eps) * r.scaling
        return RouteResult(logits=logits, scores=scores.float(), weights=weights, index=ids[local])


class DeepseekV4Adapter(DeclaredAdapter):
    """Hash-routed layers are MoE blocks the view leaves out (see the module docstring)."""

    @staticmethod
    def _is_hash(layer: nn.Module) -> bool:
        return bool(getattr(getattr(layer, "mlp", None), "is_hash", False))

    def is_moe(self, layer: nn.Module) -> bool:
        return super().is_moe(layer) and not self._is_hash(layer)

    def unviewed_moe_layers(self, model: nn.Module) -> dict[int, str]:
        return {i: HASH_REFUSAL for i, layer in enumerate(self.layers(model)) if self._is_hash(layer)}


def _tiny(cfg) -> None:
    """3 layers (one of each attention kind) of score-routed MoE; a fresh config so that the fields
    `DeepseekV4Config.__post_init__` derives (rotary sizes, rope parameters) follow the small sizes.
    tests/test_deepseek_v4.py builds one with a hash-routed layer."""
    fresh = type(cfg)(**tiny_kwargs(mlp_layer_types=["moe", "moe", "moe"]))
    cfg.__dict__.update(fresh.__dict__)


def tiny_kwargs(**overrides) -> dict:
    """A tiny DeepSeek-V4 config's fields (hidden 32, 8 experts, top-2, 2 hyper-connection streams)."""
    return dict(
        vocab_size=128, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=8,
        n_shared_experts=1, partial_rotary_factor=0.5, o_groups=2, o_lora_rank=8, index_n_heads=2,
        index_head_dim=8, index_topk=4, sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **overrides,
    )


SPEC = Family(
    name="deepseek_v4",
    model_types=("deepseek_v4",),
    routing=deepseek_v4_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    norm=("model.hc_head", "model.norm"),  # the hyper-connection streams collapse, then the final norm
    block_cls=DeepseekV4Block,
    tiny=_tiny,
)
FAMILIES[SPEC.name] = SPEC
register_adapter(DeepseekV4Adapter(SPEC))
