"""Layer-by-layer runs give each decoder layer the arguments the model's own loop gives it: masks
per attention type (sliding vs full), rotary tables per type, per-layer inputs, and state one layer
hands the next (DeepSeek sparse attention's shared top-k). Checked against whole-model forwards."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import calibrate, calibrate_hooked
from moepress.calibrate.runner import capture_inputs
from moepress.models import get_adapter
from moepress.testing import declared_families, tiny_model

from .conftest import needs_family
from .test_calibrate import assert_stats_close

IDS = torch.randint(3, 100, (4, 40), generator=torch.Generator().manual_seed(0))  # longer than tiny windows


@pytest.mark.parametrize("family", declared_families())
def test_layer_by_layer_statistics_equal_whole_model_forwards(family):
    model = tiny_model(family)
    assert_stats_close(calibrate(model, IDS, batch_size=2).stats, calibrate_hooked(model, IDS, batch_size=2),
                       rtol=1e-4)


def test_layers_of_another_attention_type_get_their_own_mask():
    model = tiny_model("mellum")  # sliding, full, sliding
    inputs = capture_inputs(model, IDS, batch_size=2)
    assert set(inputs.layer_kwargs) == {1}  # only the full-attention layer differs from layer 0
    for b in range(2):
        assert inputs.kwargs_for(2)[b] is inputs.kwargs[b]
        full, sliding = inputs.kwargs_for(1)[b]["attention_mask"], inputs.kwargs[b]["attention_mask"]
        assert isinstance(sliding, torch.Tensor) and (full is None or not torch.equal(full, sliding))


@needs_family("hy_v4")
def test_state_handed_between_layers_reaches_a_shared_indexer_layer():
    model = tiny_model("hy_v4")
    assert get_adapter(model).carried and model.config.indexer_types[1] == "shared"
    inputs = capture_inputs(model, IDS, batch_size=2)
    from moepress.calibrate.runner import run_layer

    layers = get_adapter(model).layers(model)
    run_layer(layers[0], inputs, "cpu")
    assert inputs.position == 1 and inputs.state[0]["prev_topk_indices"].shape[:2] == (2, 40)
    run_layer(layers[1], inputs, "cpu")  # raises inside transformers without the handed top-k


@needs_family("inkling2_text")
def test_block_states_are_handed_on_across_block_boundaries():
    """Inkling-2's layers read the hidden states that entered every earlier block boundary: with a
    boundary every layer, the statistics past layer 1 depend on it."""
    model = tiny_model("inkling2_text", n_layers_per_attn_res_block=1)
    assert all(layer.is_block_boundary for layer in get_adapter(model).layers(model))
    assert_stats_close(calibrate(model, IDS, batch_size=2).stats, calibrate_hooked(model, IDS, batch_size=2),
                       rtol=1e-4)


@needs_family("inkling2_text")
def test_an_argument_computed_from_earlier_layers_is_refused(monkeypatch):
    """A family whose adapter does not hand on such state gets one line naming it, not stale values."""
    from moepress.errors import MoepressError

    model = tiny_model("inkling2_text", n_layers_per_attn_res_block=1)
    monkeypatch.setattr(get_adapter(model), "state_arguments", ())
    with pytest.raises(MoepressError, match="block_states.*depends on earlier layers"):
        capture_inputs(model, IDS, batch_size=2)
