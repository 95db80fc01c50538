"""The pieces of the quality benchmark: the trainer's time budget and trunk learning rate, the recipes' configs,
and bench/quality.py's bookkeeping (step time from a calibration run, merged results, the table)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from harness import launch, train_flags
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.learning.models import build_model, set_train_mode
from ranking.learning.optim import build_optimizer
from ranking.training.scale import Scale

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trunk_learns_at_a_fraction_of_the_head_lr():
    cfg = TrainConfig(backbone="resnet18", pretrained=False, embed_dim=8, lr=1e-3, trunk_lr_scale=0.1, frozen_stages=0)
    model = build_model(cfg)
    head, trunk = build_optimizer(cfg, model).param_groups
    assert head["lr"] == 1e-3 and trunk["lr"] == 1e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(trunk["params"]) == len(list(model.trunk.parameters()))


def test_trunk_lr_scale_zero_freezes_the_trunk():
    cfg = TrainConfig(backbone="resnet18", pretrained=False, embed_dim=8, trunk_lr_scale=0.0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert [len(group["params"]) for group in optimizer.param_groups] == [2]  # the head's weight and bias


def test_frozen_stages_get_no_gradients_and_keep_their_statistics():
    cfg = TrainConfig(
        backbone="resnet18", pretrained=False, embed_dim=8, trunk_lr_scale=0.1, frozen_stages=2, freeze_bn_stats=False
    )
    model = build_model(cfg)
    head, trunk = build_optimizer(cfg, model).param_groups
    names = [name for name, _ in model.trunk.named_parameters()]
    first = names.index("layer3.0.conv1.weight")  # the stem, layer1 and layer2 come before it
    frozen = [p for _, p in list(model.trunk.named_parameters())[:first]]
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in model.trunk.layer3.parameters())
    assert {id(p) for p in trunk["params"]} == {id(p) for p in model.trunk.parameters() if p.requires_grad}
    assert trunk["lr"] == 1e-4 and len(trunk["params"]) == len(names) - first

    before = {name: tensor.clone() for name, tensor in model.trunk.state_dict().items()}
    set_train_mode(model, cfg.freeze_bn_stats)
    model(torch.randn(4, 3, 32, 32) + 3.0).sum().backward()
    assert all(p.grad is None for p in frozen) and model.trunk.layer3[0].conv1.weight.grad is not None
    after = model.trunk.state_dict()
    assert torch.equal(after["layer2.1.bn2.running_mean"], before["layer2.1.bn2.running_mean"])
    assert not torch.equal(after["layer3.0.bn1.running_mean"], before["layer3.0.bn1.running_mean"])


@pytest.mark.parametrize(
    "backbone,stages,first_trainable",
    [
        ("efficientnet_lite0", 7, "blocks.3.0.conv_pw.weight"),
        ("multiscale", 4, "convnet.layer4.0.conv1.weight"),
    ],
)
def test_frozen_stages_count_each_backbones_own_stages(backbone, stages, first_trainable):
    cfg = TrainConfig(backbone=backbone, pretrained=False, embed_dim=8, frozen_stages=3)
    model = build_model(cfg)
    build_optimizer(cfg, model)
    trainable = [name for name, p in model.trunk.named_parameters() if p.requires_grad]
    assert trainable[0] == first_trainable
    if backbone == "multiscale":  # the shallow branches are not stages of the ConvNet: they always learn
        assert "coarse.layers.1.weight" in trainable
    cfg.frozen_stages = stages + 1
    with pytest.raises(RankingError, match=f"frozen_stages is {stages + 1}, but the .* trunk has only {stages} stages"):
        build_optimizer(cfg, build_model(cfg))


def test_frozen_bn_stats_keep_the_pretrained_statistics_while_the_rest_trains():
    cfg = TrainConfig(backbone="resnet18", pretrained=False, embed_dim=8, freeze_bn_stats=True, frozen_stages=0)
    model = build_model(cfg)
    before = model.trunk.bn1.running_mean.clone()
    set_train_mode(model, cfg.freeze_bn_stats)
    model(torch.randn(4, 3, 32, 32) + 3.0).sum().backward()
    assert torch.equal(model.trunk.bn1.running_mean, before)
    assert model.training and model.head.training and not model.trunk.bn1.training
    assert model.trunk.bn1.weight.grad is not None  # the affine parameters still learn

    cfg.freeze_bn_stats = False
    set_train_mode(model, cfg.freeze_bn_stats)
    model(torch.randn(4, 3, 32, 32) + 3.0)
    assert not torch.equal(model.trunk.bn1.running_mean, before)


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
    flags.save(TrainConfig(sampler="batch", classes_per_batch=4, samples_per_class=4), tmp_path / "config.yaml")
    records = [{"step": 6, "triplets_per_s": 1.0}, {"step": 12, "triplets_per_s": 8.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.seconds_per_step(tmp_path) == 2.0  # 16 mined images per step at 8 per second
    flags.save(TrainConfig(sampler="paper", triplets_per_batch=32, neg_per_query=2), tmp_path / "config.yaml")
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
    assert rows[0] == "| recipe | budget | steps | train min | images/s | precision@30 | kNN-1 | hit@30 | mAP |"
    assert rows[2] == "| floor | none | 0 | - | - | 25.0 | 60.0 | 90.0 | 30.0 |"
    assert rows[3] == "| best | 2 min | 41 | - | - | 50.0 | 60.0 | 90.0 | 30.0 |"
    timed = {"train_seconds": 600.0, "images_per_s": 106.7}
    results = bench.save_result(path, {"recipe": "gpu", "images": 64000, "steps_done": 250, **timed, **scores})
    results = bench.save_result(path, {"recipe": "ms", "images": 64000, "steps_done": 1000, **timed, **scores})
    rows = bench.table(results, k=30).splitlines()
    assert rows[4] == "| gpu | 64,000 images | 250 | 10.0 | 106.7 | 50.0 | 60.0 | 90.0 | 30.0 |"
    assert rows[5].startswith("| ms | 64,000 images | 1000 |")  # a named recipe after the built-in ones


def test_recipes_named_by_a_file_or_by_overrides_write_the_config_that_trains(tmp_path, capsys):
    bench = load_bench()
    parser = argparse.ArgumentParser()
    base = bench.CONFIGS["best"]

    def configs(*argv: str) -> dict:
        args = argparse.Namespace(recipe=[], set=[], best_config=base, out=tmp_path)
        for flag, value in zip(argv[::2], argv[1::2]):
            getattr(args, flag).append(value)
        return bench.recipe_configs(args, parser)

    named = configs("recipe", f"plain={base}", "recipe", f"ms={base}", "set", "ms:loss=hinge")
    assert named["plain"] == base and named["best"] == base and named["ms"] == tmp_path / "ms" / "config.yaml"
    ms, default = (flags.build(TrainConfig, str(named[name])) for name in ("ms", "best"))
    assert ms.loss == "hinge" and default.loss == "multi_similarity"
    assert dataclasses.replace(ms, loss="multi_similarity") == default  # nothing else changed
    lr = flags.build(TrainConfig, str(configs("set", "best:lr=0.003", "set", "best:memory_size=0")["best"]))
    assert lr.lr == 0.003 and isinstance(lr.lr, float)
    for bad in (("set", "nobody:lr=1"), ("set", "best:lr"), ("recipe", "seed=x.yaml"), ("set", "best:loss=nope")):
        with pytest.raises(SystemExit):
            configs(*bad)
        assert bad[1].split("=")[0].split(":")[0] in capsys.readouterr().err


def test_an_images_budget_gives_each_recipe_the_same_images():
    """--images N: N / images per step steps; the large-batch recipe takes a quarter of the default's steps."""
    bench = load_bench()
    default, gpu = (flags.build(TrainConfig, str(bench.CONFIGS[name])) for name in ("best", "gpu"))
    assert bench.images_per_step(default) == 64 and bench.images_per_step(gpu) >= 256
    gpu_run, default_run = Scale.of(gpu, 1), Scale.of(default, 1)  # what one GPU trains with
    assert bench.images_per_step(gpu) * gpu_run.steps == bench.images_per_step(default) * default_run.steps
    assert gpu_run.warmup_steps * bench.images_per_step(gpu) == pytest.approx(
        default_run.warmup_steps * bench.images_per_step(default), rel=0.1
    )  # warm-up in images
    assert gpu_run.lr == 2 * default_run.lr  # sqrt of the 4x batch
    seeds = flags.build(TrainConfig, str(bench.CONFIGS["seed"]))
    assert bench.images_per_step(seeds) == 32 * 3  # a query, a positive and a negative row per triplet
