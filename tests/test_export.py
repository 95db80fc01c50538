"""`ranking export`: the ONNX and TorchScript copies of a network give its embeddings (max abs difference under 1e-4
in fp32) on real images, and each file states the model's identity, preprocessing included, as an index's
model.json; the safetensors copy loads back as the model, as do copies exported before that format."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from harness import write_smoke_run
from ranking import cli, export
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.learning.models import EVAL_RESIZE
from ranking.retrieval import inference

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(mini_zip, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = write_smoke_run(root / "run", "unused", image_size=40)
    files = {fmt: root / f"model.{fmt}" for fmt in inference.EXPORT_FORMATS}
    for fmt, path in files.items():
        assert export.main([str(run), "--format", fmt, "--out", str(path)]) == 0
    with zipfile.ZipFile(mini_zip) as z:
        jpegs = [n for n in sorted(z.namelist()) if n.endswith(".JPEG")][::40][:5]
        photos = [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in jpegs]
    photos.append(photos[0].convert("L").resize((90, 50)))  # grayscale, not square, another size
    model = inference.load(run, device="cpu")
    return {
        "run": run,
        "files": files,
        "model": model,
        "photos": photos,
        "inputs": inference.preprocess(model, photos),
        "expected": model.embed(photos),
    }


def test_onnx_runs_in_onnxruntime_with_the_models_embeddings(exported):
    import onnx
    import onnxruntime

    path = exported["files"]["onnx"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (found,) = session.run(["embeddings"], {"images": exported["inputs"].numpy()})  # 6 images: a dynamic batch
    assert found.shape == (6, 16) and found.dtype == np.float32
    assert np.abs(found - exported["expected"].numpy()).max() < TOLERANCE
    assert np.linalg.norm(found, axis=1) == pytest.approx(1, abs=1e-5)
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert session.get_modelmeta().custom_metadata_map == metadata
    described = json.loads(metadata["model.json"])
    assert described == exported["model"].describe()  # what an index folder's model.json holds
    assert described["model"] == {
        "backbone": "resnet18",
        "embed_dim": 16,
        "dropout": 0.0,
        "normalize": True,
        "image_size": 40,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize": EVAL_RESIZE,
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_runs_in_torch_jit_with_the_models_embeddings(exported):
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported["files"]["torchscript"]), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        found = scripted(exported["inputs"])
    assert found.shape == (6, 16)
    assert (found - exported["expected"]).abs().max().item() < TOLERANCE
    metadata = json.loads(extra["metadata.json"])
    assert json.loads(metadata["model.json"]) == exported["model"].describe()


def test_safetensors_loads_back_as_the_same_model(exported):
    from safetensors import safe_open

    with safe_open(str(exported["files"]["safetensors"]), "pt") as f:
        assert json.loads(f.metadata()["model.json"])["model"]["image_size"] == 40
    again = inference.load(exported["files"]["safetensors"], device="cpu")
    assert again.weights_sha256 == exported["model"].weights_sha256 and again.spec == exported["model"].spec
    assert torch.equal(again.embed(exported["photos"]), exported["expected"])


def test_a_safetensors_export_of_the_format_before_loads_as_the_same_model(exported, tmp_path):
    """deep-ranking-model/1 held the whole TrainConfig (of its version: settings since removed, some since added)
    and the preprocessing; only their model keys are read."""
    from safetensors.torch import load_file, save_file

    path = exported["files"]["safetensors"]
    model = exported["model"]
    config = {
        **dataclasses.asdict(
            TrainConfig(
                backbone="resnet18",
                embed_dim=16,
                image_size=40,
                pretrained=False,
                frozen_stages=0,
                freeze_bn_stats=False,
            )
        ),
        "removed_setting": 1,
    }
    del config["stored_size"]
    legacy = {
        "format": "deep-ranking-model/1",
        "config": config,
        "embed_dim": 16,
        "normalize": True,
        "flip": False,
        "preprocessing": {
            "image_size": 40,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "resize": EVAL_RESIZE,
            "layout": "NCHW float32 RGB",
            "range": "[0, 1] before normalisation",
        },
        "source": model.source,
    }
    old = tmp_path / "old.safetensors"
    save_file(
        load_file(str(path)),
        str(old),
        metadata={"format": "deep-ranking-model/1", "image_size": "40", "model.json": json.dumps(legacy)},
    )
    again = inference.load(old, device="cpu")
    assert again.spec == model.spec and again.weights_sha256 == model.weights_sha256
    assert torch.equal(again.embed(exported["photos"]), exported["expected"])
    legacy["preprocessing"]["resize"] = "stretch"
    save_file(load_file(str(path)), str(old), metadata={"model.json": json.dumps(legacy)})
    with pytest.raises(RankingError, match=r"old.safetensors: config: resize rule 'stretch'"):
        inference.load(old)


def test_bad_export_requests_are_one_line(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: no such run, checkpoint, index or model file" in err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError, match="argument --format: invalid choice: 'tflite'"):
        export.main([str(exported["run"]), "--format", "tflite", "--out", str(tmp_path / "m")])
    text = tmp_path / "model.safetensors"
    text.write_text("not safetensors")
    with pytest.raises(RankingError, match="model.safetensors: not a readable safetensors file"):
        inference.load(text)
