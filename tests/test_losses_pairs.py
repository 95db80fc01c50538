"""The pair and proxy losses and the cross-batch memory: multi-similarity and proxy-anchor against loops over the
papers' formulas, the ring memory's order and warm-up, and with real gloo ranks (2 and 3) that DDP's gradients (the
proxies' too) equal one process's on the concatenated batch and that every rank holds the same memory and proxies.

This file is also the script of the DDP check: `accelerate launch tests/test_losses_pairs.py ddp OUT`.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import launch
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.learning.losses import DistributedLoss, MultiSimilarityLoss, ProxyAnchorLoss, build_loss, build_objective
from ranking.learning.memory import CrossBatchMemory
from ranking.learning.optim import build_optimizer

GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # fp32; the two sides differ only in summation order


def loop_multi_similarity(
    x: torch.Tensor, labels: torch.Tensor, memory=None, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1
) -> float:
    """Wang et al. 2019, eq. 8-10 and 13, one anchor at a time."""
    x = F.normalize(x.double(), dim=1)
    cand, cand_labels = x, labels
    if memory is not None:
        cand = torch.cat([x, F.normalize(memory[0].double(), dim=1)])
        cand_labels = torch.cat([labels, memory[1]])
    losses = []
    for i in range(len(x)):
        pos = [float(x[i] @ cand[j]) for j in range(len(cand)) if cand_labels[j] == labels[i] and j != i]
        neg = [float(x[i] @ cand[j]) for j in range(len(cand)) if cand_labels[j] != labels[i]]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s > min(pos) - epsilon]
        kept_pos = [s for s in pos if s < max(neg) + epsilon]
        losses.append(
            math.log(1 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
            + math.log(1 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta
        )
    return sum(losses) / len(losses)


def test_multi_similarity_matches_the_papers_formulas():
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # class 4 has no positive: not an anchor
    loss, active = MultiSimilarityLoss(2.0, 50.0, 0.5, 0.1)(x, labels)
    assert loss.item() == pytest.approx(loop_multi_similarity(x, labels), rel=1e-5)
    assert 0 < active.item() < 1  # the mining dropped some pairs
    memory = (torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 5, 5]))
    with_memory, _ = MultiSimilarityLoss(2.0, 50.0, 0.5, 0.1)(x, labels, memory=memory)
    assert with_memory.item() == pytest.approx(loop_multi_similarity(x, labels, memory), rel=1e-5)
    assert with_memory.item() != pytest.approx(loss.item(), rel=1e-3)


def loop_proxy_anchor(x: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, alpha=32.0, delta=0.1) -> float:
    """Kim et al. 2020, eq. 4, one proxy at a time."""
    x, proxies = F.normalize(x.double(), dim=1), F.normalize(proxies.double(), dim=1)
    positive = negative = 0.0
    in_batch = [c for c in range(len(proxies)) if (labels == c).any()]
    for c in range(len(proxies)):
        similarities = [(float(x[i] @ proxies[c]), int(labels[i]) == c) for i in range(len(x))]
        negative += math.log(1 + sum(math.exp(alpha * (s + delta)) for s, own in similarities if not own))
        if c in in_batch:
            positive += math.log(1 + sum(math.exp(-alpha * (s - delta)) for s, own in similarities if own))
    return positive / len(in_batch) + negative / len(proxies)


def test_proxy_anchor_matches_the_papers_formula_and_learns_its_proxies():
    torch.manual_seed(0)
    x = torch.randn(10, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 4])  # class 3 is not in the batch: a negative proxy only
    loss_fn = ProxyAnchorLoss(num_classes=5, embed_dim=5, alpha=16.0, delta=0.1, seed=3)
    assert torch.equal(loss_fn.proxies, ProxyAnchorLoss(5, 5, seed=3).proxies)  # seeded, not the run's RNG
    loss, misplaced = loss_fn(x, labels)
    reference = loop_proxy_anchor(x.detach(), labels, loss_fn.proxies.detach(), alpha=16.0, delta=0.1)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    assert 0 < misplaced.item() < 1
    optimizer = torch.optim.SGD([x, *loss_fn.parameters()], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        loss_fn(x, labels)[0].backward()
        optimizer.step()
    final, misplaced = loss_fn(x, labels)
    assert final.item() < 0.5 * loss.item() and misplaced.item() == 0
    with pytest.raises(RankingError, match="2 classes"):
        ProxyAnchorLoss(num_classes=1, embed_dim=5)


def test_proxy_anchor_config_sizes_the_proxies_and_gives_them_their_own_lr():
    cfg = TrainConfig(loss="proxy_anchor", embed_dim=6, proxy_alpha=16, proxy_delta=0.2, lr=1e-3, proxy_lr_scale=50)
    objective = build_objective(cfg, num_classes=7)
    assert objective.loss.proxies.shape == (7, 6) and (objective.loss.alpha, objective.loss.delta) == (16, 0.2)
    model = nn.Sequential(nn.Linear(4, 6))
    model.parameter_groups = lambda lr, *_: [{"params": list(model.parameters()), "name": "head"}]
    groups = build_optimizer(cfg, model, objective).param_groups
    assert [g["name"] for g in groups] == ["head", "proxies"] and groups[1]["lr"] == pytest.approx(0.05)
    assert groups[1]["params"][0] is objective.loss.proxies
    with pytest.raises(ConfigError, match="sampler batch"):
        TrainConfig(loss="proxy_anchor", sampler="paper").validate()


def test_multi_similarity_is_small_for_separated_classes_and_descent_reduces_it():
    centres = torch.eye(4) * 5
    labels = torch.arange(16) % 4
    separated, _ = MultiSimilarityLoss()(centres[labels] + 0.01 * torch.randn(16, 4), labels)
    torch.manual_seed(1)
    x = torch.randn(16, 8, requires_grad=True)
    loss_fn = MultiSimilarityLoss()
    first, _ = loss_fn(x, labels)
    optimizer = torch.optim.SGD([x], lr=2.0)
    for _ in range(100):
        optimizer.zero_grad()
        loss_fn(x, labels)[0].backward()
        optimizer.step()
    assert separated.item() < 0.05 < first.item()
    assert loss_fn(x, labels)[0].item() < 0.5 * first.item()


def test_multi_similarity_without_pairs_is_zero_with_a_graph_and_memory_rows_get_no_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    loss, active = MultiSimilarityLoss()(x, torch.arange(4))  # no positive anywhere
    assert loss.item() == 0 and active.item() == 0 and loss.requires_grad
    memory_rows = torch.randn(4, 3, requires_grad=True)
    loss, _ = MultiSimilarityLoss()(x, torch.arange(4), memory=(memory_rows, torch.arange(4)))
    loss.backward()  # the memory gives every row a positive
    assert loss.item() > 0 and x.grad is not None and x.grad.abs().sum() > 0
    assert memory_rows.grad is None or memory_rows.grad.abs().sum() == 0


def test_memory_is_a_ring_of_the_latest_rows_after_its_warm_up():
    memory = CrossBatchMemory(size=5, start_images=4)
    assert memory.contents() is None
    memory.enqueue(torch.arange(3.0)[:, None], torch.tensor([0, 1, 2]))
    assert memory.contents() is None  # 3 rows enqueued, 4 needed
    memory.enqueue(torch.arange(3.0, 6.0)[:, None], torch.tensor([3, 4, 5]))
    rows, labels = memory.contents()
    assert sorted(labels.tolist()) == [1, 2, 3, 4, 5] and sorted(rows[:, 0].tolist()) == [1, 2, 3, 4, 5]
    memory.enqueue(torch.arange(6.0, 13.0)[:, None], torch.arange(6, 13))  # larger than the memory: its last rows
    assert sorted(memory.contents()[1].tolist()) == [8, 9, 10, 11, 12]


def test_config_builds_the_memory_and_refuses_it_without_a_pair_loss():
    objective = build_objective(TrainConfig(loss="multi_similarity", memory_size=64, memory_start_images=128))
    assert objective.memory is not None and (objective.memory.size, objective.memory.start_images) == (64, 128)
    assert build_objective(TrainConfig()).memory is None  # today's default: no memory
    loss = build_loss(TrainConfig(loss="multi_similarity", ms_alpha=3, ms_beta=40, ms_base=0.4, ms_epsilon=0.2))
    assert isinstance(loss, MultiSimilarityLoss)
    assert (loss.alpha, loss.beta, loss.base, loss.epsilon) == (3, 40, 0.4, 0.2)
    with pytest.raises(ConfigError, match="memory_size"):
        TrainConfig(loss="hinge", memory_size=64).validate()


# ------------------------------------------------------------------------------------ DDP: real gloo processes

GLOBAL_ROWS, CLASSES, STEPS, FEATURES = 12, 4, 3, 8


def memory_problem() -> tuple[nn.Module, DistributedLoss, torch.Tensor, torch.Tensor]:
    """A seeded linear embedding, STEPS batches of GLOBAL_ROWS inputs (every class on every rank at 2 and 3 ranks),
    and the objective: multi-similarity with a 20-row memory that joins after the first batch (it wraps at step 3)."""
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 6)
    inputs = torch.randn(STEPS, GLOBAL_ROWS, FEATURES)
    labels = torch.stack([torch.randperm(GLOBAL_ROWS) % CLASSES for _ in range(STEPS)])
    objective = DistributedLoss(MultiSimilarityLoss(), "semihard", 0.2, CrossBatchMemory(20, GLOBAL_ROWS))
    return model, objective, inputs, labels


def proxy_problem() -> tuple[nn.Module, DistributedLoss, torch.Tensor, torch.Tensor]:
    """The same embedding and batches with the proxy-anchor objective (one more proxy than the batches' classes)."""
    model, _, inputs, labels = memory_problem()
    return model, DistributedLoss(ProxyAnchorLoss(CLASSES + 1, 6, alpha=8.0), "semihard", 0.2), inputs, labels


def train_steps(model: nn.Module, objective: DistributedLoss, inputs, labels, rows, backward) -> list[torch.Tensor]:
    """STEPS steps of plain SGD on the model and the loss's own parameters; each step's gradients of the weight
    (after DDP's average when ``model`` is wrapped) and of the proxies, if any."""
    grads = []
    parameters = list(model.parameters()) + list(objective.parameters())
    for step in range(STEPS):
        for p in parameters:
            p.grad = None
        backward(objective(model(inputs[step, rows]), labels[step, rows]).objective)
        grads.append(torch.cat([parameters[0].grad.flatten(), *(p.grad.flatten() for p in objective.parameters())]))
        with torch.no_grad():
            for p in parameters:
                p -= 0.5 * p.grad
    return grads


def ddp_worker(out: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = GLOBAL_ROWS // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results = {}
    for name, problem in (("memory", memory_problem), ("proxy", proxy_problem)):
        model, objective, inputs, labels = problem()
        ddp_model = accelerator.prepare(model)
        grads = train_steps(ddp_model, objective, inputs, labels, rows, accelerator.backward)
        results[name] = {"grads": grads, "memory": objective.memory.contents() if objective.memory else None}
    torch.save(results, f"{out}.{rank}")
    accelerator.end_training()


def assert_grads_equal(ranked: list[torch.Tensor], reference: list[torch.Tensor], rank: int) -> None:
    for step, (ddp, ref) in enumerate(zip(ranked, reference, strict=True)):
        torch.testing.assert_close(ddp, ref, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=f"rank {rank} step {step}")


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_gradients_memory_and_proxies_equal_one_process_on_the_concatenated_batch(tmp_path, world):
    out = tmp_path / "ddp.pt"
    result = launch(["ddp", str(out)], processes=world, script=__file__, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr

    model, objective, inputs, labels = memory_problem()
    reference = train_steps(model, objective, inputs, labels, slice(None), lambda loss: loss.backward())
    ref_rows, ref_labels = objective.memory.contents()
    model, no_memory, inputs, labels = memory_problem()
    no_memory.memory = None
    without = train_steps(model, no_memory, inputs, labels, slice(None), lambda loss: loss.backward())
    model, proxy_objective, inputs, labels = proxy_problem()
    proxy_reference = train_steps(model, proxy_objective, inputs, labels, slice(None), lambda loss: loss.backward())
    for rank in range(world):
        ranked = torch.load(f"{out}.{rank}", weights_only=True)
        assert_grads_equal(ranked["memory"]["grads"], reference, rank)
        rows, memory_labels = ranked["memory"]["memory"]
        torch.testing.assert_close(rows, ref_rows, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        assert torch.equal(memory_labels, ref_labels)
        assert_grads_equal(ranked["proxy"]["grads"], proxy_reference, rank)  # the weight's and the proxies' parts
    torch.testing.assert_close(reference[0], without[0])  # the memory is still warming up at step 1
    assert not torch.allclose(reference[1], without[1], rtol=1e-2)  # then it changes the gradient


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    ddp_worker(sys.argv[2])
