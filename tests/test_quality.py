"""The pieces of the quality benchmark: the trainer's time budget and trunk learning rate, the recipes' configs,
and bench/quality.py's bookkeeping (step time from a calibration run, merged results, the table)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from test_train import launch, train_flags

from ranking import config
from ranking.config import TrainConfig
from ranking.models import build_model
from ranking.train import build_optimizer, set_train_mode

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trunk_learns_at_a_fraction_of_the_head_lr():
    cfg = TrainConfig(backbone="resnet18", embed_dim=8, lr=1e-3, trunk_lr_scale=0.1)
    model = build_model(cfg)
    head, trunk = build_optimizer(cfg, model).param_groups
    assert head["lr"] == 1e-3 and trunk["lr"] == 1e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(trunk["params"]) == len(list(model.trunk.parameters()))


def test_trunk_lr_scale_zero_freezes_the_trunk():
    cfg = TrainConfig(backbone="resnet18", embed_dim=8, trunk_lr_scale=0.0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert [len(group["params"]) for group in optimizer.param_groups] == [2]  # the head's weight and bias


def test_frozen_bn_stats_keep_the_pretrained_statistics_while_the_rest_trains():
    from accelerate import Accelerator

    cfg = TrainConfig(backbone="resnet18", embed_dim=8, freeze_bn_stats=True)
    model = build_model(cfg)
    before = model.trunk.bn1.running_mean.clone()
    set_train_mode(model, Accelerator(cpu=True), cfg)
    model(torch.randn(4, 3, 32, 32) + 3.0).sum().backward()
    assert torch.equal(model.trunk.bn1.running_mean, before)
    assert model.training and model.head.training and not model.trunk.bn1.training
    assert model.trunk.bn1.weight.grad is not None  # the affine parameters still learn

    cfg.freeze_bn_stats = False
    set_train_mode(model, Accelerator(cpu=True), cfg)
    model(torch.randn(4, 3, 32, 32) + 3.0)
    assert not torch.equal(model.trunk.bn1.running_mean, before)


def test_recipes_follow_the_issue():
    seed = config.build(TrainConfig, str(REPO / "configs" / "seed.yaml"))
    assert (seed.sampler, seed.pos_per_query, seed.neg_per_query, seed.loss, seed.margin, seed.embed_dim,
            seed.normalize) == ("paper", 1, 1, "triplet_margin", 1.0, 4096, False)
    assert (seed.optimizer, seed.lr, seed.momentum, seed.nesterov, seed.weight_decay, seed.schedule,
            seed.warmup_steps, seed.grad_clip) == ("sgd", 1e-3, 0.9, True, 1e-5, "constant", 0, 0.0)
    best = config.build(TrainConfig, str(REPO / "configs" / "best.yaml"))
    assert (best.backbone, best.pretrained, best.sampler, best.normalize, best.optimizer, best.schedule) == (
        "efficientnet_lite0", True, "batch", True, "adamw", "cosine")
    assert best.embed_dim < seed.embed_dim and 0 < best.trunk_lr_scale < 1 and best.warmup_steps > 0


def test_time_limit_stops_every_rank_at_the_same_step_with_a_checkpoint(synth_shards, tmp_path):
    run_dir = tmp_path / "budget"
    budget = {"time-limit-minutes": 0.1, "checkpoint-every": 100_000, "no-wandb": None}
    flags = train_flags(synth_shards, run_dir, steps=100_000, sampler="paper", **budget)
    result = launch(flags, processes=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time limit of 0.1 min reached" in result.stderr
    latest = (run_dir / "checkpoints" / "latest").resolve()
    step = torch.load(latest / "state.pt", weights_only=True)["step"]
    assert 0 < step < 100_000 and latest.name == f"step-{step:07d}"
    ranks = [torch.load(latest / f"rng-rank{r}.pt", weights_only=True)["step"] for r in (0, 1)]
    assert ranks == [step, step]


def test_step_time_comes_from_the_calibration_runs_last_interval(tmp_path):
    bench = load_bench()
    config.save(TrainConfig(sampler="batch", classes_per_batch=4, samples_per_class=4), tmp_path / "config.yaml")
    records = [{"step": 6, "triplets_per_s": 1.0}, {"step": 12, "triplets_per_s": 8.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.seconds_per_step(tmp_path) == 2.0  # 16 mined images per step at 8 per second
    config.save(TrainConfig(sampler="paper", triplets_per_batch=32, neg_per_query=2), tmp_path / "config.yaml")
    assert bench.seconds_per_step(tmp_path) == 8.0  # 64 triplets per step


def test_results_merge_by_recipe_and_tabulate_in_recipe_order(tmp_path):
    bench = load_bench()
    path = tmp_path / "results.json"
    scores = {"precision_at_k": 0.5, "knn1_accuracy": 0.6, "hit_at_k": 0.9, "map": 0.3}
    bench.save_result(path, {"recipe": "best", "minutes": 2, "steps_done": 40, **scores})
    bench.save_result(path, {"recipe": "floor", **scores, "precision_at_k": 0.25})
    results = bench.save_result(path, {"recipe": "best", "minutes": 2, "steps_done": 41, **scores})
    assert json.loads(path.read_text()) == results and list(results) == ["best", "floor"]
    rows = bench.table(results, k=30).splitlines()
    assert rows[0] == "| recipe | train time | steps | precision@30 | kNN-1 | hit@30 | mAP |"
    assert rows[2] == "| floor | none | 0 | 25.0 | 60.0 | 90.0 | 30.0 |"
    assert rows[3] == "| best | 2 min | 41 | 50.0 | 60.0 | 90.0 | 30.0 |"
