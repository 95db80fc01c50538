"""A trained network as a function from images to embeddings: ``ranking.load(path).embed(images)``.

    EmbeddingModel.from_run(RUN or CHECKPOINT)   the network of a run's checkpoint, its manifest verified
    EmbeddingModel.from_folder(INDEX)             the network an index folder carries (model.safetensors + model.json)
    EmbeddingModel.from_safetensors(FILE)         a network exported by ``ranking export --format safetensors``
    load(path)                                    whichever of the three ``path`` is
    model.embed(images) -> FloatTensor[N, D]      PIL images, image paths or uint8 tensors, through the eval transform
    model.export(FILE, "onnx" | "torchscript" | "safetensors")

Every embedding of images in memory (search queries, ``ranking.load(...).embed``) goes through ``embed``, which calls
``ranking.retrieval.embed.embed_images``; sharded embedding of galleries uses
``ranking.retrieval.embed.embed_local``: both apply
``augment.EvalResize`` (on the device, to uint8 images) and ``models.embed_with_mirror``, so a query and its gallery
see the same preprocessing.
A model's identity (``models.ModelSpec``: network and preprocessing) travels with every saved or exported model, as
MODEL_JSON's ``model`` entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ranking.core.config import ExportFormat
from ranking.core.errors import RankingError
from ranking.core.files import open_regular, read_json, write_atomically, write_text_atomically
from ranking.data.archive import read_regular_file
from ranking.data.decode import decode_image, from_pil
from ranking.folders import checkpoint, runfolder
from ranking.learning import models
from ranking.learning.models import ModelSpec

MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
MODEL_FORMAT = "deep-ranking-model/2"  # MODEL_JSON: {"format", "model": ModelSpec.to_dict(), "flip", "source"}
LEGACY_MODEL_FORMAT = "deep-ranking-model/1"  # written before: {"format", "config": TrainConfig, "preprocessing", ...}
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
ImageLike = Image.Image | str | os.PathLike | torch.Tensor


# ---------------------------------------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, shorter_side: int | None = None) -> torch.Tensor:
    """An image file of any format as uint8 ``[3, H, W]``, upright RGB (``ranking.data.decode.decode_image``; a
    large one reduced on decoding to no less than ``shorter_side``), read within ``ranking.data.archive``'s size
    limits; RankingError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RankingError(f"{path}: no such image file")
    return decode_image(read_regular_file(path), str(path), shorter_side)


def to_images(images: ImageLike | Iterable[ImageLike], shorter_side: int | None = None) -> list[torch.Tensor]:
    """uint8 RGB ``[3, H, W]`` tensors from PIL images (EXIF orientation applied, as for a file), paths (decoded
    reduced to no less than ``shorter_side``, ``load_image``), or uint8 tensors ([3, H, W], [1, H, W], [H, W] or a
    batch [N, 3, H, W]), so a tensor is embedded exactly as its pixels."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    elif isinstance(images, torch.Tensor):
        images = list(images) if images.dim() == 4 else [images]
    found = []
    for n, image in enumerate(images):
        if isinstance(image, Image.Image):
            found.append(from_pil(image))
        elif isinstance(image, (str, os.PathLike)):
            found.append(load_image(image, shorter_side))
        elif isinstance(image, torch.Tensor):
            if (
                image.dtype != torch.uint8
                or image.dim() not in (2, 3)
                or (image.dim() == 3 and image.shape[0] not in (1, 3))
            ):
                raise RankingError(
                    f"image {n}: a tensor must be uint8 [3, H, W], [1, H, W] or [H, W]; got "
                    f"{str(image.dtype).removeprefix('torch.')} {list(image.shape)}"
                )
            gray = image.dim() == 2 or image.shape[0] == 1
            found.append(image.reshape(1, *image.shape[-2:]).expand(3, -1, -1).contiguous() if gray else image)
        else:
            raise RankingError(f"image {n}: expected a PIL image, a path or a uint8 tensor; got {type(image).__name__}")
    return found


# ---------------------------------------------------------------------------------------------------------- model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise RankingError(f"--device {device!r}: {str(e).splitlines()[0]}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RankingError(f"--device {device}: no CUDA device here (use --device cpu)")
    return parsed


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """The identity of a network's weights: sha256 over the sorted names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EmbeddingModel:
    """An ``EmbeddingNet`` in eval mode with what it takes to use it: its identity (``spec``: what rebuilds and feeds
    it), whether embeddings are the mean of an image's and its mirror image's (``flip``), and where it came from
    (``source``: run folder, checkpoint, step and ``weights_sha256``).

    Every trained model is loaded here (``load``): from a run or checkpoint folder (``from_run``, its checkpoint
    verified against its sha256 manifest), an index folder (``from_folder``) or an exported .safetensors
    (``from_safetensors``); each rebuilds the network from its ModelSpec alone."""

    def __init__(
        self,
        net: torch.nn.Module,
        spec: ModelSpec,
        source: dict[str, Any],
        flip: bool = False,
        device: str | torch.device | None = None,
    ):
        self.spec = spec
        self.net = net.eval()
        self.flip = flip
        self.source = source
        self.device = parse_device(device)
        self.net.to(self.device)

    # -------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_run(
        cls,
        path: str | os.PathLike,
        flip: bool = False,
        device: str | torch.device | None = None,
        spec: ModelSpec | None = None,
    ) -> EmbeddingModel:
        """The network of a run folder's latest checkpoint or of a checkpoint folder; its identity is ``spec`` (an
        evaluation folder's, say) or else the run's config.yaml's (``ModelSpec.of_run``)."""
        checkpoint_dir = runfolder.resolve_checkpoint(path)
        run_dir = runfolder.run_of(checkpoint_dir)
        spec = spec or ModelSpec.of_run(run_dir)
        weights, step = checkpoint.load_weights(checkpoint_dir)  # verified against checkpoint.json first
        net = trained_net(spec, weights, checkpoint_dir / runfolder.STATE)
        source = {
            "run_dir": str(run_dir),
            "checkpoint": str(checkpoint_dir),
            "step": step,
            "weights_sha256": weights_sha256(net.state_dict()),
        }
        return cls(net, spec, source, flip, device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> EmbeddingModel:
        """The model an index folder carries: MODEL_JSON (identity, flip, source) and MODEL_WEIGHTS."""
        folder = Path(folder)
        described = read_json(folder / MODEL_JSON, "not found (not an index or model folder)")
        return cls._rebuild(described, folder / MODEL_JSON, folder / MODEL_WEIGHTS, device)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> EmbeddingModel:
        """A model exported with ``--format safetensors``: the weights, and MODEL_JSON's content in the metadata."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise RankingError(f"{path}: not a readable safetensors file ({e})") from None
        try:
            described = json.loads(metadata[MODEL_JSON])
        except (KeyError, ValueError):
            raise RankingError(f"{path}: no {MODEL_JSON} in its metadata (not written by `ranking export`)") from None
        return cls._rebuild(described, path, path, device)

    @classmethod
    def _rebuild(
        cls, described: Any, described_in: Path, weights: Path, device: str | torch.device | None
    ) -> EmbeddingModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        spec, flip, source = read_description(described, described_in)
        try:  # regular files only (a FIFO would hang the load), mapped rather than read
            with open_regular(weights):
                state = load_file(str(weights))
        except FileNotFoundError:
            raise RankingError(f"{weights}: missing: the model's weights") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise RankingError(f"{weights}: not a readable safetensors file ({e})") from None
        net = trained_net(spec, state, weights)
        recorded = source.get("weights_sha256")
        found = weights_sha256(net.state_dict()) if recorded else ""
        if recorded and found != recorded:
            raise RankingError(
                f"{weights}: not the weights {described_in.name} records (weights_sha256 "
                f"{str(recorded)[:12]}..., found {found[:12]}...): replaced "
                "or damaged; an index's embeddings only match the model that made them"
            )
        return cls(net, spec, source, flip, device)

    # -------------------------------------------------------------------------------------------------- using

    @property
    def dim(self) -> int:
        return self.spec.embed_dim

    @property
    def normalize(self) -> bool:
        return self.spec.normalize

    @property
    def step(self) -> int:
        return int(self.source.get("step", 0))

    @property
    def weights_sha256(self) -> str:
        return str(self.source.get("weights_sha256", ""))

    def to(self, device: str | torch.device | None) -> EmbeddingModel:
        self.device = parse_device(device)
        self.net.to(self.device)
        return self

    def embed(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64) -> torch.Tensor:
        """[N, D] float32 embeddings on the CPU of PIL images, image paths or uint8 tensors, in full precision."""
        from ranking.retrieval.embed import embed_images

        return embed_images(
            self.net,
            self.spec,
            to_images(images, self.spec.image_size),
            flip=self.flip,
            batch_size=batch_size,
            device=self.device,
        )

    def describe(self) -> dict[str, Any]:
        """MODEL_JSON's content: the model's identity (``ModelSpec.to_dict``), flip, and where it came from."""
        return {"format": MODEL_FORMAT, "model": self.spec.to_dict(), "flip": self.flip, "source": self.source}

    def save(self, folder: str | os.PathLike) -> None:
        """MODEL_WEIGHTS and MODEL_JSON in ``folder``, each atomically."""
        from safetensors.torch import save

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        payload = save(state, metadata={"format": MODEL_FORMAT})
        write_atomically(folder / MODEL_WEIGHTS, lambda f: f.write(payload))
        write_text_atomically(folder / MODEL_JSON, json.dumps(self.describe(), indent=2) + "\n")

    # -------------------------------------------------------------------------------------------------- export

    def export(self, path: str | os.PathLike, fmt: ExportFormat) -> Path:
        """The embedding network alone (input: preprocessed images [N, 3, S, S]; output: [N, D]), with MODEL_JSON's
        content (its identity, preprocessing included, and source) in the file's metadata; written atomically."""
        if fmt not in EXPORT_FORMATS:
            raise RankingError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        if self.flip:
            raise RankingError(
                "a model that averages mirrored embeddings (flip) is exported as its plain network; "
                "load it without flip"
            )
        net = self.net.to("cpu").eval()
        size = self.spec.image_size
        example = torch.zeros(2, 3, size, size)
        metadata = {
            "format": MODEL_FORMAT,
            MODEL_JSON: json.dumps(self.describe()),
            "input": "images",
            "output": "embeddings",
        }
        try:
            with warnings.catch_warnings():
                # torch.jit and the TorchScript-based ONNX exporter are deprecated in favour of torch.export, but their
                # files are what onnxruntime and a C++ libtorch load today; the user asked for them
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                if fmt == "safetensors":
                    from safetensors.torch import save

                    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
                    payload = save(state, metadata=metadata)
                elif fmt == "torchscript":
                    with torch.inference_mode(False), torch.no_grad():
                        traced = torch.jit.trace(net, example, check_trace=False)
                    buffer = io.BytesIO()
                    torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
                    payload = buffer.getvalue()
                else:
                    payload = _onnx_bytes(net, example, metadata)
        finally:
            self.net.to(self.device)
        return write_atomically(Path(path), lambda f: f.write(payload))


def read_description(described: Any, where: Path) -> tuple[ModelSpec, bool, dict[str, Any]]:
    """(identity, flip, source) of MODEL_JSON's content in either format: MODEL_FORMAT stores the ModelSpec itself;
    LEGACY_MODEL_FORMAT (index folders and exports written before) a TrainConfig and its preprocessing, of which only
    the model's keys are read, so a TrainConfig of any version maps."""
    if not isinstance(described, dict) or described.get("format") not in (MODEL_FORMAT, LEGACY_MODEL_FORMAT):
        raise RankingError(f"{where}: not a {MODEL_FORMAT} description")
    if not isinstance(described.get("source"), dict):
        raise RankingError(f"{where}: no 'source' entry")
    if described["format"] == MODEL_FORMAT:
        spec = ModelSpec.from_dict(described.get("model"), f"{where}: model")
    else:
        config, preprocessing = described.get("config"), described.get("preprocessing")
        if not isinstance(config, dict) or not isinstance(preprocessing, dict):
            raise RankingError(f"{where}: no 'config' or 'preprocessing' entry")
        mapped = {
            "backbone": config.get("backbone"),
            "embed_dim": config.get("embed_dim"),
            "dropout": config.get("dropout", 0.0),
            "normalize": config.get("normalize"),
            "image_size": preprocessing.get("image_size"),
            "mean": preprocessing.get("mean"),
            "std": preprocessing.get("std"),
            "resize": preprocessing.get("resize"),
        }
        spec = ModelSpec.from_dict(mapped, f"{where}: config")
    return spec, bool(described.get("flip", False)), dict(described["source"])


def trained_net(spec: ModelSpec, state: dict[str, torch.Tensor], weights: Path) -> torch.nn.Module:
    """The network of ``spec`` holding the weights ``state`` (read from ``weights``), in eval mode."""
    net = models.build_model(spec, pretrained=False)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise RankingError(
            f"{weights}: weights do not fit the model {spec.backbone} with embed_dim "
            f"{spec.embed_dim} ({str(e).splitlines()[0]})"
        ) from None
    return net.eval()


def _onnx_bytes(net: torch.nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    try:
        import onnx
    except ImportError:
        raise RankingError(
            "--format onnx needs the Python package 'onnx': pip install 'deep-ranking[export]'"
        ) from None
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        exported = Path(tmp) / "model.onnx"
        torch.onnx.export(
            net,
            (example,),
            exported,
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            opset_version=17,
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        )
        proto = onnx.load(str(exported))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "deep-ranking embedding network; its identity and preprocessing in metadata_props['model.json']"
    return proto.SerializeToString()


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def load(path: str | os.PathLike, device: str | torch.device | None = None, flip: bool = False) -> EmbeddingModel:
    """The model of a run folder, a checkpoint folder, an index folder or an exported ``.safetensors`` file."""
    path = Path(path)
    if is_model_folder(path):
        return EmbeddingModel.from_folder(path, device)
    if path.is_file() and path.suffix == ".safetensors":
        return EmbeddingModel.from_safetensors(path, device)
    if not path.exists():
        raise RankingError(f"{path}: no such run, checkpoint, index or model file")
    return EmbeddingModel.from_run(path, flip, device)


def preprocess(model: EmbeddingModel, images: ImageLike | Iterable[ImageLike]) -> torch.Tensor:
    """The network's input for ``images`` (as ``embed`` takes them): [N, 3, S, S] float32 after
    ``augment.EvalResize``, on the CPU (to feed an exported copy)."""
    from ranking.data.augment import EvalResize

    resize = EvalResize(model.spec.image_size, model.spec.mean, model.spec.std)
    return resize(to_images(images, model.spec.image_size))
