"""Routing means over whole calibration documents, carried layer by layer beside a greedy search.

CD-MoE's reference computes its fixed weights in a separate script (duterscmy/CD-MoE
`cd-moe/get_weight/get_weight.py`): each calibration document is tokenised WHOLE (BOS first, no
`max_length`, L23-31) and run through the model alone (batch size 1, so no padding, L33-41), while the
router of every MoE layer adds each token's post-top-k weight and a count to its expert's running sums
(`get_weight/modeling_deepseek.py` L313-345); the weight is Σ weight / count (`get_weight.py`
L162-166). The sums run over every routed (token, slot) of every document, so the mean is per routed
token pooled over the documents (a longer document weighs more), not a mean of per-document means.
Its searches see only the first 256 tokens of each document.

`DocumentRouting` does that computation with the search's own layer-by-layer machinery: each document
is its own batch of one (its layer-0 input and layer arguments from `capture_inputs`), and while the
search's original pass has decoder layer j on the device, `step` runs j over every document with the
MoE block's forward wrapped to add the routing of its input (`MoEBlock.route`, as the family's router
computes it: scoring, top-k, renormalisation and scaling as the model applies them) into a
`RoutingMass`. The in-memory and the streamed search call it the same way, so both get the same weights.
Documents are capped at the model's context length by the caller (`data.documents`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moepress.calibrate.runner import LayerInputs, capture_inputs, run_layer
from moepress.calibrate.stats import LayerStats
from moepress.methods.simulate import forward_replaced
from moepress.models.base import Adapter, MoEBlock


@dataclass
class RoutingMass:
    """Per routed expert: Σ of the post-top-k gate weight it received, and on how many tokens.

    The same sums as `LayerStats.weight_sum` / `count` / `tokens`, without the expert outputs the
    full statistics also compute (the search needs only the weights). As there, slots routed to extra
    router rows (ids >= E, e.g. LongCat-Flash's identity experts) are not experts and are not counted.
    """

    weight_sum: torch.Tensor  # [E] float64
    count: torch.Tensor  # [E] float64
    tokens: int = 0

    @classmethod
    def zeros(cls, num_experts: int) -> RoutingMass:
        zeros = torch.zeros(num_experts, dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def update(self, block: MoEBlock, x: torch.Tensor) -> None:
        route = block.route(x.reshape(-1, block.hidden_size))
        index = route.index.reshape(-1).cpu()
        weights = route.weights.reshape(-1).double().cpu()
        real = index < self.weight_sum.shape[0]  # extra router rows have no slot
        index, weights = index[real], weights[real]
        self.weight_sum.index_add_(0, index, weights)
        self.count.index_add_(0, index, torch.ones(index.shape, dtype=torch.float64))
        self.tokens += route.index.shape[0]

    # CD-MoE's fixed weights from these sums: the full statistics' own quotients, not a second copy
    mean_weight_all_tokens = LayerStats.mean_weight_all_tokens
    mean_weight_routed_tokens = LayerStats.mean_weight_routed_tokens


class DocumentRouting:
    """Per MoE layer, the routing mass of the original model over whole documents (see the module doc)."""

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        documents: list[torch.Tensor],
        capture_device: torch.device,
        storage: torch.device,
    ):
        self._zeros = RoutingMass.zeros
        self.inputs: list[LayerInputs] = [
            capture_inputs(model, doc.reshape(1, -1), 1, adapter, capture_device, storage=storage) for doc in documents
        ]
        self.tokens = sum(int(doc.numel()) for doc in documents)
        self.stats: dict = {}  # MoE layer -> RoutingMass
        self.layer_forwards = 0  # decoder layers run over all the documents

    @torch.no_grad()
    def step(self, j: int, layer: nn.Module, block: MoEBlock | None, device: torch.device) -> None:
        """Run decoder layer j (on `device`) over every document; with `block` (layer j's MoE block view)
        add the routing of its input to `stats[j]`."""
        if block is not None:
            mass = self.stats[j] = self._zeros(block.num_experts)
            original = block.module.forward

            def recorder(x: torch.Tensor, *args, **kwargs):
                mass.update(block.bind(x, *args, **kwargs), x)
                return original(x, *args, **kwargs)

            with forward_replaced(block.module, recorder):
                for inputs in self.inputs:
                    run_layer(layer, inputs, device, index=j)
        else:
            for inputs in self.inputs:
                run_layer(layer, inputs, device, index=j)
        self.layer_forwards += 1

    def close(self) -> None:
        self.inputs = []
