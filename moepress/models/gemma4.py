"""Gemma 4 (`gemma4_text`, and `gemma4`: the multimodal wrapper) in transformers v5.

Quirks spelled out here:
- There is no MoE block module. With `enable_moe_block` (then every layer is an MoE layer) the decoder
  layer holds `router` (`Gemma4TextRouter`) and `experts` (`Gemma4TextExperts`) as its own children and
  adds an MoE branch BESIDE its dense MLP; with h the hidden state after attention:
      dense = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))
      moe   = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))
      out   = h + post_feedforward_layernorm(dense + moe)
  The MoE block here is `moe` as a function of h (`Gemma4MoE`, a view calling the layer's own pieces).
  The layer is not of the residual form h + block(h) (the last norm mixes both branches), so the cached
  CD-MoE search runs it whole.
- Router: an RMSNorm WITHOUT scale, times the learned `scale` [H] and H^-0.5, then `proj` (no bias,
  activations' dtype); softmax in float32, top-k, renormalised to sum 1, THEN each chosen weight times
  `per_expert_scale[e]` (`Gemma4Block.route`); a pruned router keeps the kept experts' entries of it.
- The router sees h, the experts see `pre_feedforward_layernorm_2(h)`: the store (`Gemma4Experts`)
  applies that norm, so every method's "expert e's output" is the experts module's own. Novices stand
  in for that output inside the routed sum, before `post_feedforward_layernorm_2` (as a `NoviceExperts`
  in the experts slot computes). A dropped block outputs 0 (the RMSNorm of 0).
- For hooks and forward replacement (calibration, search) to reach the branch, `Gemma4Adapter.block`
  switches the layer to `Gemma4ViewedLayer`, the same forward calling the view (same ops, same bits).
  Checkpoints never see this: the view owns no tensors and the layer's state dict is unchanged.
- Surgery works on the layer's own children (`MoEBlock.owner` is the layer: paths `router`, `experts`):
  pruning rebuilds the family's router and experts classes at the kept size (plain config when
  uniform), novices go in a `NoviceExperts` in the experts slot; a condensed layer keeps its router
  (`condense_keeps_router`: the stock layer calls it, its output is then ignored) with
  `FixedWeightExperts` in the experts slot; a dropped layer's experts become a `DroppedMLP` (its router
  and the two norms stay, since the stock layer calls them).
- Layers: `model.layers` (`gemma4_text`, `Gemma4ForCausalLM`) or `model.language_model.layers`
  (`gemma4`, `Gemma4ForConditionalGeneration`); the expert count is the text config's `num_experts`.
- Each layer takes its own arguments: a per-layer input (`per_layer_input`, Per-Layer Embeddings), the
  mask and rotary table of its attention type (full-attention layers have their own head size,
  `global_head_dim`, kv-head count and partial rotary). Nothing here handles them: the layer-by-layer
  runner (calibration, searches) records and hands on every layer's own arguments, so layer-by-layer
  statistics equal whole-model forwards on every layer. Streamed loading computes the non-persistent
  `embed_scale` and per-type `*_inv_freq` buffers with the model's own init (generic, `calibrate.streaming`).
- The tiny model has what the released configs have: sliding layers, then a full-attention last layer
  with twice the head size (`global_head_dim`), one kv head and keys reused as values (`attention_k_eq_v`:
  no `v_proj`), proportional partial rotary on full layers, per-layer inputs, logit soft-capping and
  tied embeddings. Not in it: KV sharing across layers (`num_kv_shared_layers`, in the dense E2B/E4B
  checkpoints); with it, layer-by-layer calibration still equals whole-model forwards (each batch's
  `shared_kv_states` object is recorded once and handed to every layer), but searches that re-run a
  storing layer under candidate plans are unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer
from transformers.utils.deprecation import deprecate_kwarg

from moepress.models.base import Adapter, MoEBlock, RouteResult, Routing, TransformersExperts, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family
from moepress.modules.compressed import DroppedMLP


class Gemma4MoE(nn.Module):
    """The MoE branch of one decoder layer as a module: h -> norm2_post(experts(norm2_pre(h), router(h))).

    It calls the layer's CURRENT router, experts and norms (surgery may have replaced them), and owns
    nothing: `router` and `experts` are registered here too, refreshed by the adapter, only so the view
    shows (and sizes) what the block holds."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["layer"] = layer  # not registered: the layer owns (and saves) the pieces
        self.refresh()

    def refresh(self) -> None:
        self.router = self.layer.router
        self.experts = self.layer.experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = layer.router(flat)
        out = layer.experts(layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
        return layer.post_feedforward_layernorm_2(out.reshape(hidden_states.shape))


class Gemma4ViewedLayer(Gemma4TextDecoderLayer):
    """`Gemma4TextDecoderLayer` whose MoE branch runs through its `Gemma4MoE` view (`moepress_moe`), so
    that hooks on the view and a replaced view forward take effect. Otherwise transformers' forward
    line by line (transformers 5.x)."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        per_layer_input: torch.Tensor | None = None,
        shared_kv_states=None,
        position_embeddings: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states

        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            shared_kv_states=shared_kv_states,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)

        if self.enable_moe_block:
            hidden_states_1 = self.post_feedforward_layernorm_1(hidden_states)
            hidden_states_2 = self.__dict__["moepress_moe"](residual)
            hidden_states = hidden_states_1 + hidden_states_2

        hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        if self.hidden_size_per_layer_input:
            residual = hidden_states
            hidden_states = self.per_layer_input_gate(hidden_states)
            hidden_states = self.act_fn(hidden_states)
            hidden_states = hidden_states * per_layer_input
            hidden_states = self.per_layer_projection(hidden_states)
            hidden_states = self.post_per_layer_input_norm(hidden_states)
            hidden_states = residual + hidden_states

        hidden_states *= self.layer_scalar
        return hidden_states


def moe_view(layer: nn.Module) -> Gemma4MoE:
    """The layer's MoE view, made once (the layer switched to `Gemma4ViewedLayer`), its pieces refreshed."""
    view = layer.__dict__.get("moepress_moe")
    if view is None:
        if not isinstance(layer, Gemma4TextDecoderLayer):
            raise TypeError(f"expected a Gemma4TextDecoderLayer, got {type(layer).__name__}")
        view = Gemma4MoE(layer)
        layer.__dict__["moepress_moe"] = view
        layer.__class__ = Gemma4ViewedLayer
    else:
        view.refresh()
    return view


class Gemma4Experts(TransformersExperts):
    """The layer's experts as the block sees them: on the block input h, after the layer's
    `pre_feedforward_layernorm_2` (so not a plain MLP of the store's input)."""

    def __init__(self, module: nn.Module, norm: nn.Module):
        super().__init__(module)
        self.norm = norm

    @property
    def is_plain_mlp(self) -> bool:
        return False  # the input passes an RMSNorm first: REAM's activation matching on raw h would be wrong

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return super().forward(self.norm(x), e)

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return super().grouped_forward(self.norm(x), counts)


@dataclass
class Gemma4Block(MoEBlock):
    """Router on a scale-free RMSNorm of h; top-k weights renormalised, then times `per_expert_scale`;
    the routed sum through `post_feedforward_layernorm_2`."""

    # the stock layer calls its router whatever its experts are: a condensed layer keeps it
    condense_keeps_router = True

    @property
    def owner(self) -> nn.Module:
        return self.module.layer  # the router and experts are the decoder layer's own children

    @property
    def router(self) -> nn.Module:
        return self.module.layer.router

    @property
    def post_norm_2(self) -> nn.Module:
        return self.module.layer.post_feedforward_layernorm_2

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        h = router.norm(x.reshape(-1, self.hidden_size))
        h = h * router.scale * router.scalar_root_size
        return F.linear(h, self.router_weight).float()

    def route(self, x, active=None, logits=None) -> RouteResult:
        route = super().route(x, active, logits)
        route.weights = route.weights * self.router.per_expert_scale[route.index]
        return route

    def forward(self, x, action=None, novices=None):
        out = super().forward(x, action, novices)
        return out if action is not None and action.action == "drop" else self.post_norm_2(out)


class Gemma4Adapter(DeclaredAdapter):
    """Blocks are views over the decoder layer (`Gemma4MoE`), not one of its children."""

    def is_moe(self, layer: nn.Module) -> bool:
        experts = getattr(layer, "experts", None)
        return bool(getattr(layer, "enable_moe_block", False)) and experts is not None and not isinstance(
            experts, DroppedMLP
        )

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        view = moe_view(layer)
        router = layer.router
        return Gemma4Block(
            layer_idx=layer_idx,
            module=view,
            router_weight=router.proj.weight,
            routing=self.spec.routing(router, router.config),
            experts=Gemma4Experts(layer.experts, layer.pre_feedforward_layernorm_2),
        )

    def component(self, name: str) -> str:
        if ".router." in name:
            return "router"
        if ".experts." in name:
            return "routed_experts"
        return Adapter.component(self, name)


def gemma4_routing(router, config) -> Routing:
    # softmax over all experts, top-k, renormalised; `per_expert_scale` comes after (Gemma4Block.route)
    return Routing(scoring="softmax", top_k=config.top_k_experts, norm_topk=True, logits_in_fp32=False)


def _tiny(cfg) -> None:
    """Every layer an MoE layer beside its dense MLP; small per-layer embeddings; two sliding-window
    layers and a full-attention last layer with its own head size and kv heads (see the module docstring)."""
    text = cfg.get_text_config()
    for key, value in dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                           hidden_size_per_layer_input=8, vocab_size_per_layer_input=512, sliding_window=4,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           attention_k_eq_v=True, final_logit_softcapping=30.0).items():
        setattr(text, key, value)
    text.per_layer_config = {2: {"head_dim": 16, "num_key_value_heads": 1}}
    cfg.tie_word_embeddings = text.tie_word_embeddings = True


for _spec in (
    Family(name="gemma4_text", model_types=("gemma4_text",), routing=gemma4_routing, mlp=(), router="router",
           tiny=_tiny),
    Family(name="gemma4", model_types=("gemma4",), routing=gemma4_routing, mlp=(), router="router",
           layers="model.language_model.layers", norm="model.language_model.norm", tiny=_tiny),
):
    FAMILIES[_spec.name] = _spec
    register_adapter(Gemma4Adapter(_spec))
