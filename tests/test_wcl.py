"""WCL: NT-Xent, SupCon, the 1-NN graph and its components, the cross-view mask swap, gradients, K-NN multi-crop."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

import trainers
from orchestrator import spec as experiment_spec
from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import wcl
from trainers._common.contract import ConfigError

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments" / "wcl").glob("*.yaml"))


@functools.cache
def digits_batch(views: str = "two_crop", size: int = 8) -> tuple[dict[str, torch.Tensor], trainers.DataInfo]:
    data = build_data(DataSpec(dataset="digits", image_size=16, num_local_crops=2), seed=0, views=views)
    return torch.utils.data.default_collate([data.train[i] for i in range(size)]), data.info


def same_component(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, None] == labels[None, :]


# ---------------------------------------------------------------------------------------------- losses by hand


def test_nt_xent_by_hand():
    # B = 2 images; view 1: a = (1, 0), b = (0, 1); view 2: a' = (1, 0), b' = (0, -1); tau = 1/2 doubles each dot.
    # a: others b, a', b' -> logits 0, 2, 0, positive a' -> log(2 + e^2) - 2 = log(1 + 2 e^-2) = 0.239548 (a' alike)
    # b: others a, a', b' -> logits 0, 0, -2, positive b' -> log(2 + e^-2) + 2 = log(1 + 2 e^2) = 2.758623 (b' alike)
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    keys = torch.cat([z1, z2])  # (4, 2)
    exclude = torch.eye(4, dtype=torch.bool)
    logits = wcl.similarity_logits(keys, keys, exclude, tau=0.5)
    loss = wcl.nt_xent(logits, torch.tensor([2, 3, 0, 1]))
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(1 + 2 * math.exp(2))) / 2  # 1.499086
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_instance_loss_matches_the_official_indexing():
    """Self columns removed and targets b-1..2b-2, 0..b-1, as network/wcl.py writes it (one process)."""
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    loss, _ = wcl.instance_loss((z1, z2), torch.arange(5), tau=0.1)
    z = torch.cat([z1, z2])  # (10, 8)
    prob = z @ z.T / 0.1
    logits = prob[~torch.eye(10, dtype=torch.bool)].view(10, 9)
    labels = torch.cat([torch.arange(4, 9), torch.arange(0, 5)])
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_sup_con_by_hand():
    # tau 1; keys k0 = (1, 0), k1 = (0.6, 0.8), k2 = (0, 1); queries k0 (positives k1, k2) and k1 (positive k0).
    # query 0: logits [self, 0.6, 0], L0 = log(e^0.6 + 1) = 1.037544, loss = -((0.6 - L0) + (0 - L0)) / 2 = L0 - 0.3
    # query 1: logits [0.6, self, 0.8], L1 = log(e^0.6 + e^0.8) = 1.398135, loss = L1 - 0.6
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    exclude = torch.tensor([[True, False, False], [False, True, False]])
    positives = torch.tensor([[False, True, True], [True, False, False]])
    loss = wcl.sup_con(wcl.similarity_logits(keys[:2], keys, exclude, tau=1.0), positives)
    l0, l1 = math.log(math.exp(0.6) + 1), math.log(math.exp(0.6) + math.exp(0.8))
    assert loss.item() == pytest.approx(((l0 - 0.3) + (l1 - 0.6)) / 2, rel=1e-6)  # 0.767839


# ---------------------------------------------------------------------------------------------- weak labels


def test_nearest_neighbour_graph_and_components_on_a_constructed_case():
    # Clusters {0, 1} and {2, 3, 4} (4 -> 3 <-> 2), and a chain 5 -> 6 -> 7 -> 6 that must merge into one component.
    sim = torch.full((8, 8), -0.5)
    edges = {(0, 1): 0.9, (2, 3): 0.8, (3, 4): 0.7, (2, 4): 0.1, (5, 6): 0.3, (6, 7): 0.4, (5, 7): 0.2}
    for (i, j), s in edges.items():
        sim[i, j] = sim[j, i] = s
    sim.fill_diagonal_(1.0)
    nn_index = wcl.nearest_neighbours(sim)
    assert nn_index.tolist() == [1, 0, 3, 2, 3, 6, 7, 6]
    labels = wcl.connected_components(nn_index)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    assert torch.equal(same_component(labels), same_component(groups))
    assert int(wcl._count_components(labels)) == 3


def test_components_of_long_chains_and_a_three_cycle():
    chain = torch.cat([torch.arange(1, 33), torch.tensor([31])])  # 0 -> 1 -> ... -> 32 -> 31: one component
    assert wcl.connected_components(chain).unique().numel() == 1
    cycle = torch.tensor([1, 2, 0, 0, 3])  # 0 -> 1 -> 2 -> 0 (exact ties), 3 -> 0, 4 -> 3
    assert wcl.connected_components(cycle).unique().numel() == 1
    two = torch.tensor([2, 3, 4, 5, 2, 3])  # interleaved: 0 -> 2 -> 4 <-> 2 and 1 -> 3 -> 5 <-> 3
    assert torch.equal(same_component(wcl.connected_components(two)), same_component(torch.tensor([0, 1] * 3)))


def test_components_equal_scipys_on_random_embeddings():
    torch.manual_seed(0)
    for n, d in [(64, 3), (200, 8)]:
        z = F.normalize(torch.randn(n, d), dim=1)
        nn_index = wcl.nearest_neighbours(z @ z.T)
        ours = wcl.weak_labels(z)
        graph = csr_matrix((torch.ones(n).numpy(), (torch.arange(n).numpy(), nn_index.numpy())), shape=(n, n))
        _, theirs = scipy_components(graph, directed=False)
        assert torch.equal(same_component(ours), same_component(torch.from_numpy(theirs)))


def test_graph_loss_swaps_the_views_masks():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(4, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    labels1 = torch.tensor([0, 0, 2, 2])  # view 1's components {0, 1}, {2, 3}
    labels2 = torch.tensor([0, 1, 0, 1])  # view 2's components {0, 2}, {1, 3}
    loss = wcl.graph_loss((z1, z2), (z1, z2), (labels1, labels2), torch.arange(4), tau=0.1)
    # every component has two members: one positive per query, SupCon = cross-entropy on it
    diagonal = torch.eye(4, dtype=torch.bool)
    log_p1 = F.log_softmax((z1 @ z1.T / 0.1).masked_fill(diagonal, -math.inf), dim=1)
    log_p2 = F.log_softmax((z2 @ z2.T / 0.1).masked_fill(diagonal, -math.inf), dim=1)
    from_view_2 = -log_p1[torch.arange(4), torch.tensor([2, 3, 0, 1])].mean()  # view 1 queries, view 2's partners
    from_view_1 = -log_p2[torch.arange(4), torch.tensor([1, 0, 3, 2])].mean()  # view 2 queries, view 1's partners
    torch.testing.assert_close(loss, (from_view_2 + from_view_1) / 2)
    unswapped = wcl.graph_loss((z1, z2), (z1, z2), (labels2, labels1), torch.arange(4), tau=0.1)
    assert not torch.allclose(loss, unswapped)


# ---------------------------------------------------------------------------------------------- gradients


def test_gathered_keys_carry_gradient_only_in_this_ranks_rows(monkeypatch: pytest.MonkeyPatch):
    """Rank 1 of a simulated world of 2: the other rank's rows come from the gather, this rank's are z itself."""
    other = torch.randn(3, 4)

    @torch.no_grad()
    def gather(x: torch.Tensor) -> torch.Tensor:
        assert not x.requires_grad
        return torch.cat([other, x])

    monkeypatch.setattr(wcl, "all_gather_cat", gather)
    z = torch.randn(3, 4, requires_grad=True)
    keys = wcl._with_own_rows(z, offset=3)
    torch.testing.assert_close(keys, torch.cat([other, z.detach()]))
    assert not torch.autograd.grad(keys[:3].sum(), z, retain_graph=True)[0].any()
    assert torch.equal(torch.autograd.grad(keys[3:].sum(), z)[0], torch.ones(3, 4))


def test_train_step_as_rank_1_of_a_simulated_world(monkeypatch: pytest.MonkeyPatch):
    """Rank 1 of 2 whose rank 0 holds this batch rolled by one: the NT-Xent rows and targets sit at offset B."""
    monkeypatch.setattr(wcl, "all_gather_cat", torch.no_grad()(lambda x: torch.cat([x.roll(1, dims=0), x])))
    monkeypatch.setattr(wcl, "_rank", lambda: 1)
    batch, info = digits_batch()
    model = wcl.build(wcl.TINY, info)
    loss, _ = wcl.train_step(model, batch, wcl.TINY, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    z1, z2 = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    loss_nce, _ = wcl.instance_loss((z1, z2), 4 + torch.arange(4), tau=0.1)
    keys = torch.cat([z1.roll(1, dims=0), z1, z2.roll(1, dims=0), z2])  # (16, 8): rank 0, rank 1, per view
    own, partner = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]), torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])
    logits = (torch.cat([z1, z2]) @ keys.T / 0.1).masked_fill(F.one_hot(own, 16).bool(), -math.inf)
    torch.testing.assert_close(loss_nce, F.cross_entropy(logits, partner))


def test_graph_and_local_losses_give_no_gradient_to_the_keys():
    torch.manual_seed(0)
    z = (torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True))
    z_all = (torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True))
    labels = (torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 0, 1]))
    z_local = torch.randn(8, 3, requires_grad=True)
    rows = torch.arange(4)
    losses = wcl.graph_loss(z, z_all, labels, rows, tau=0.1) + wcl.local_loss(z_local, z_all, rows, knn_k=1, tau=0.1)
    grads = torch.autograd.grad(losses, [*z, z_local, *z_all], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:3])  # the queries: this rank's views, local crops
    assert grads[3] is None and grads[4] is None  # the keys


def test_online_classifier_gives_no_gradient_to_the_encoder():
    batch, info = digits_batch()
    cfg = dataclasses.replace(wcl.TINY, lambda_nce=0.0, lambda_graph=0.0)
    model = wcl.build(cfg, info)
    loss, metrics = wcl.train_step(model, batch, cfg, 0)
    loss.backward()
    assert all(not p.grad.any() for p in model.encoder.encoder.parameters())
    assert model.encoder.head.weight.grad.abs().sum() > 0
    torch.testing.assert_close(loss.detach(), metrics["loss_online"])


def test_online_classifier_skips_unlabelled_images():
    head = torch.nn.Linear(4, 3)
    h, y = torch.randn(4, 4), torch.tensor([0, -1, 2, -1])
    loss, acc = wcl.online_classifier(head, h, y)
    logits = head(h)
    torch.testing.assert_close(loss, F.cross_entropy(logits[[0, 2]], y[[0, 2]]))
    assert acc.item() == pytest.approx((logits[[0, 2]].argmax(1) == y[[0, 2]]).float().mean().item())


# ---------------------------------------------------------------------------------------------- K-NN multi-crop


def test_knn_positives_on_a_constructed_case():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.5], [0.9, 1.0, 0.2, 0.3], [0.1, 0.2, 1.0, 0.4], [0.5, 0.3, 0.4, 1.0]])
    expected_1 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    expected_2 = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(wcl.knn_positives(sim, 1), expected_1)
    assert torch.equal(wcl.knn_positives(sim, 2), expected_2)
    assert wcl.knn_positives(sim, 10).all()  # k capped at N - 1


def test_local_crops_take_their_image_and_its_nearest_neighbour_in_both_views():
    # Global directions at 0, 10 and 90 degrees in both views: NN(0) = 1, NN(1) = 0, NN(2) = 1.
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0]))
    z_all = (torch.stack([angles.cos(), angles.sin()], dim=1),) * 2  # (3, 2) each
    torch.manual_seed(0)
    z_local = F.normalize(torch.randn(6, 2), dim=1)  # 2 crops per image, image-major
    # columns: view 1 images 0, 1, 2, then view 2 images 0, 1, 2
    positives = torch.tensor([[1, 1, 0, 1, 1, 0]] * 4 + [[0, 1, 1, 0, 1, 1]] * 2, dtype=torch.bool)
    expected = wcl.sup_con(z_local @ torch.cat(z_all).T / 0.1, positives)
    torch.testing.assert_close(wcl.local_loss(z_local, z_all, torch.arange(3), knn_k=1, tau=0.1), expected)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("views", ["two_crop", "multi_crop"])
def test_tiny_trains_a_few_steps_with_finite_loss(views: str):
    torch.manual_seed(0)
    batch, info = digits_batch(views)
    cfg = dataclasses.replace(wcl.TINY, knn_multicrop=views == "multi_crop", knn_k=2)
    model = wcl.build(cfg, info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        loss, metrics = wcl.train_step(model, batch, cfg, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert ("loss_local" in metrics) == cfg.knn_multicrop


def test_check_rejects_bad_values():
    with pytest.raises(ConfigError, match="knn_k"):
        wcl.check(dataclasses.replace(wcl.TINY, knn_k=0))
    wcl.check(wcl.TINY)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(trainers.TRAINERS, "wcl", "trainers.wcl")
    loaded = experiment_spec.load(path)
    assert loaded.method == "wcl" and loaded.views == "two_crop"
