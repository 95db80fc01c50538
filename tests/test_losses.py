"""Losses: the paper's hinge by hand, TripletMarginLoss against torch, Smooth-AP against exact AP, and the
distributed wrapper that mines (its DDP behaviour is tested with real processes in test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from ranking.core.config import TrainConfig
from ranking.learning.losses import (
    DistributedLoss,
    HingeTripletLoss,
    SmoothAPLoss,
    TripletMarginLoss,
    build_loss,
    build_objective,
)
from ranking.learning.miners import MINERS, mine_triplets


def test_hinge_matches_hand_computation():
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 0])
    triplets = torch.tensor([[0, 1, 2], [0, 3, 1]])
    # D(q,p) = 1, D(q,n) = 4: max(0, 0.2 + 1 - 4) = 0;  D(q,p) = 9, D(q,n) = 1: 0.2 + 9 - 1 = 8.2
    loss, active = HingeTripletLoss(margin=0.2)(embeddings, labels, triplets)
    assert loss.item() == pytest.approx(8.2 / 2)
    assert active.item() == pytest.approx(0.5)
    loss.backward()
    # d/dq of (D(q,p) - D(q,n)) / 2 for the active triplet: (2(q-p) - 2(q-n)) / 2 = n - p = (1, -3)
    assert embeddings.grad[0].tolist() == pytest.approx([1.0, -3.0])


def test_hinge_is_zero_when_every_triplet_is_satisfied():
    embeddings = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [3.0, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss, active = HingeTripletLoss(margin=0.2)(embeddings, labels, mine_triplets(embeddings, labels, "all", 0.2))
    assert loss.item() == 0.0 and active.item() == 0.0
    loss.backward()
    assert embeddings.grad.abs().sum() == 0


def test_triplet_margin_matches_torch():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 8, generator=g)
    labels = torch.arange(12) % 3
    triplets = torch.tensor([[0, 3, 1], [1, 4, 2], [2, 5, 0], [6, 9, 7]])
    loss, active = TripletMarginLoss(margin=1.0)(embeddings, labels, triplets)
    q, p, n = embeddings[triplets].unbind(1)
    expected = torch.nn.TripletMarginLoss(margin=1.0)(q, p, n)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    per_triplet = torch.nn.TripletMarginLoss(margin=1.0, reduction="none")(q, p, n)
    assert active.item() == pytest.approx((per_triplet > 0).float().mean().item())


@pytest.mark.parametrize("miner", ["hard", "semihard", "all"])
def test_the_objective_mines_when_no_triplets_are_given(miner):
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(16, 4, generator=g, requires_grad=True)
    labels = torch.arange(16) % 4
    loss_fn = HingeTripletLoss(margin=0.5)
    loss = DistributedLoss(loss_fn, miner, margin=0.5)(embeddings, labels).objective
    mined = mine_triplets(embeddings, labels, miner, 0.5)
    assert loss.item() == pytest.approx(loss_fn(embeddings, labels, mined)[0].item())
    loss.backward()
    assert embeddings.grad.abs().sum() > 0


def test_losses_compute_in_float32_under_bf16():
    g = torch.Generator().manual_seed(2)
    embeddings = torch.randn(8, 4, generator=g).to(torch.bfloat16)
    labels = torch.arange(8) % 2
    for loss_fn in (HingeTripletLoss(0.2), SmoothAPLoss(0.01)):
        _, loss, active = DistributedLoss(loss_fn, "hard", 0.2)(embeddings, labels)
        assert loss.dtype == torch.float32 and 0 <= active.item() <= 1


def test_no_valid_triplet_gives_a_zero_loss_with_a_graph():
    embeddings = torch.randn(4, 3, requires_grad=True)
    loss, _, active = DistributedLoss(HingeTripletLoss(0.2), "hard", 0.2)(embeddings, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0 and active.item() == 0
    loss.backward()  # DDP needs every rank to run backward through the model
    assert embeddings.grad is not None


def exact_map(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over queries of sklearn's AP, ranking all other rows by cosine similarity."""
    x = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = (x @ x.T).numpy()
    aps = []
    for q in range(len(labels)):
        others = np.arange(len(labels)) != q
        relevant = (labels[others] == labels[q]).numpy()
        if relevant.any():
            aps.append(average_precision_score(relevant, similarity[q, others]))
    return float(np.mean(aps))


def test_smooth_ap_approaches_exact_ap_as_tau_shrinks():
    g = torch.Generator().manual_seed(3)
    embeddings = torch.randn(20, 6, generator=g)
    labels = torch.arange(20) % 4
    loss, _ = SmoothAPLoss(tau=1e-5)(embeddings, labels)
    assert loss.item() == pytest.approx(1 - exact_map(embeddings, labels), abs=1e-4)


def test_smooth_ap_falls_as_rankings_improve_and_stays_in_unit_interval():
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(24) % 4
    centers = torch.eye(4, 8)[labels] * 3
    noise = torch.randn(24, 8, generator=g)
    loss_fn = SmoothAPLoss(tau=0.01)
    losses, actives, exact = [], [], []
    for t in torch.linspace(0, 1, 8):  # from noise to perfectly separated classes
        embeddings = noise * (1 - t) + centers * t
        loss, active = loss_fn(embeddings, labels)
        losses.append(loss.item())
        actives.append(active.item())
        exact.append(1 - exact_map(embeddings, labels))
    assert all(0.0 <= v <= 1.0 for v in losses)
    for i in range(len(exact)):
        for j in range(len(exact)):
            if exact[i] > exact[j] + 0.02:  # a clearly better ranking has a clearly lower loss
                assert losses[i] > losses[j], (losses, exact)
    assert losses[0] > 0.5 and losses[-1] < 1e-3
    assert actives[0] > 0.3 and actives[-1] == 0.0


def test_smooth_ap_gradient_descent_reduces_it():
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(16, 4, generator=g, requires_grad=True)
    labels = torch.arange(16) % 4
    loss_fn = SmoothAPLoss(tau=0.1)
    optimizer = torch.optim.SGD([embeddings], lr=1.0)
    first = loss_fn(embeddings, labels)[0].item()
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(embeddings, labels)[0].backward()
        optimizer.step()
    assert loss_fn(embeddings, labels)[0].item() < first - 0.1


def test_build_loss():
    assert isinstance(build_loss(TrainConfig(loss="hinge", margin=0.3)), HingeTripletLoss)
    margin_loss = build_loss(TrainConfig(loss="triplet_margin", margin=1.0, miner="all"))
    assert isinstance(margin_loss, TripletMarginLoss) and margin_loss.margin == 1.0
    objective = build_objective(TrainConfig(loss="triplet_margin", margin=1.0, miner="all"))
    assert objective.miner == "all" and objective.margin == 1.0 and MINERS[objective.miner] is not None
    smooth = build_loss(TrainConfig(loss="smooth_ap", smooth_ap_tau=0.05))
    assert isinstance(smooth, SmoothAPLoss) and smooth.tau == 0.05
