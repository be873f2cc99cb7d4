"""HC-SMoE's clustering (`merging.agglomerate`): the joins scipy makes for average / single / complete
linkage, the cluster-size bound, and the hyperparameters `linkage` and `max_cluster_size`."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import calibrate
from moepress.errors import MoepressError
from moepress.methods import get_method
from moepress.methods.merging import (
    agglomerate,
    average_linkage,
    cosine_distance,
    euclidean_distance,
    kept_count,
    mean_outputs,
)
from moepress.models import get_adapter
from moepress.testing import tiny_model

IDS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def scipy_clusters(distance: torch.Tensor, n_clusters: int, method: str) -> list[list[int]]:
    """The clusters left after the first E − n joins of scipy's linkage."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n = distance.shape[0]
    joins = linkage(squareform(distance.numpy(), checks=False), method=method)
    clusters = {e: [e] for e in range(n)}
    for step, (a, b, _, _) in enumerate(joins[: n - n_clusters]):
        clusters[n + step] = clusters.pop(int(a)) + clusters.pop(int(b))
    return sorted(sorted(c) for c in clusters.values())


@pytest.mark.parametrize("method", ["average", "single", "complete"])
def test_agglomerate_makes_scipys_joins(method):
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randn(24, 6, generator=g, dtype=torch.float64)  # continuous: no ties
        for d in (torch.cdist(x, x), cosine_distance(x)):
            for k in (2, 7, 18):
                assert agglomerate(d, k, method) == scipy_clusters(d, k, method)


def test_average_linkage_is_agglomerate_average():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert average_linkage(torch.cdist(x, x), 5) == agglomerate(torch.cdist(x, x), 5, "average")


def test_euclidean_average_linkage_collapses_small_outputs_into_one_cluster():
    """What the bundled checkpoints show (and HC-SMoE issue #2 on Qwen3): experts whose mean outputs
    are small sit close together near 0 in Euclidean distance, so average linkage gathers them into
    one cluster; cosine distance compares directions and does not; a size bound splits it."""
    g = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.cat([torch.full((8,), 0.05), torch.full((8,), 1.0)]).double()
    features = directions * scale[:, None]
    euclid = agglomerate(euclidean_distance(features), 8, "average")
    assert set(range(8)) <= set(max(euclid, key=len))  # every small-output expert in one cluster
    assert max(len(c) for c in agglomerate(cosine_distance(features), 8, "average")) < 8
    bounded = agglomerate(euclidean_distance(features), 8, "average", max_size=2)
    assert len(bounded) == 8 and max(len(c) for c in bounded) == 2


def test_max_size_bounds_every_cluster_and_still_reaches_the_count():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = torch.cdist(x, x)
    # bounds with which greedy joins cannot get stuck (a stuck state needs every cluster > cap / 2)
    for k, cap in ((10, 2), (12, 2), (7, 4), (5, 6)):
        groups = agglomerate(d, k, "average", max_size=cap)
        assert len(groups) == k and max(len(c) for c in groups) <= cap
        assert sorted(e for c in groups for e in c) == list(range(20))
    # 8 points into 3 clusters of at most 3 cannot be reached by joins that never exceed 3 (4 pairs
    # of 2 leave no pair that fits): the bound rises by one then
    line = torch.tensor([[0.0], [1.0], [10.0], [11.0], [20.0], [21.0], [30.0], [31.0]])
    groups = agglomerate(torch.cdist(line, line), 3, "average", max_size=3)
    assert len(groups) == 3 and max(len(c) for c in groups) == 4


def test_unknown_linkage_is_refused():
    with pytest.raises(MoepressError, match="linkage must be one of"):
        agglomerate(torch.zeros(3, 3), 2, "ward")


def _calibrated():
    model = tiny_model("olmoe")
    blocks = get_adapter(model).blocks(model)
    return model, blocks, calibrate(model, IDS, batch_size=2, keep_moe_inputs=512)


def test_hc_smoe_linkage_and_cluster_bound_hyperparameters():
    _, blocks, result = _calibrated()
    run = get_method("hc-smoe")
    for linkage in ("average", "single", "complete"):
        for distance in ("cosine", "euclidean"):
            for bound in (0, 2):
                plan = run(result.stats, 0.5, blocks=blocks, moe_inputs=result.moe_inputs, distance=distance,
                           linkage=linkage, max_cluster_size=bound)
                assert plan.hyperparameters["linkage"] == linkage
                assert plan.hyperparameters["max_cluster_size"] == bound
                for i, block in blocks.items():
                    n = kept_count(result.stats[i], 0.5)
                    d = (cosine_distance if distance == "cosine" else euclidean_distance)(
                        mean_outputs(block, result.moe_inputs[i]))
                    assert plan.metadata["groups"][str(i)] == agglomerate(d, n, linkage, bound or None)
                    if bound:
                        assert max(len(g) for g in plan.metadata["groups"][str(i)]) <= bound
    with pytest.raises(MoepressError, match="linkage"):
        run(result.stats, 0.5, blocks=blocks, moe_inputs=result.moe_inputs, linkage="ward")
    with pytest.raises(MoepressError, match="max_cluster_size"):
        run(result.stats, 0.5, blocks=blocks, moe_inputs=result.moe_inputs, max_cluster_size=-1)


def test_hc_smoe_default_is_the_references_clustering():
    """Default: Euclidean distance between mean outputs over all sampled tokens, average linkage, no
    bound (`hcsmoe/merging/clustering.py`'s `hierarchical_clustering`), the issue-24 finding."""
    _, blocks, result = _calibrated()
    plan = get_method("hc-smoe")(result.stats, 0.25, blocks=blocks, moe_inputs=result.moe_inputs)
    assert (plan.hyperparameters["distance"], plan.hyperparameters["linkage"],
            plan.hyperparameters["max_cluster_size"]) == ("euclidean", "average", 0)
    for i, block in blocks.items():
        features = mean_outputs(block, result.moe_inputs[i])
        want = scipy_clusters(torch.cdist(features, features), kept_count(result.stats[i], 0.25), "average")
        assert plan.metadata["groups"][str(i)] == want
