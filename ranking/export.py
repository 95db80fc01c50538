"""`ranking export RUN --format onnx|torchscript|safetensors --out FILE`: the embedding network alone, for serving.

The exported network maps preprocessed images, float32 [N, 3, S, S], to embeddings [N, D] (L2-normalised if the run
normalises). Its preprocessing is in the file's metadata (ONNX metadata_props, TorchScript's extra file
metadata.json, safetensors' header): image_size S, mean and std, the resize rule, and model.json (the TrainConfig
and the checkpoint it came from). RUN is a run folder, a checkpoint folder or an index folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ranking import cli
from ranking.core.config import ExportFormat
from ranking.core.flags import parse
from ranking.retrieval import inference


@dataclass
class ExportConfig:
    run: str = field(metadata={"positional": True})  # a run folder (its latest checkpoint), checkpoint or index folder

    # output
    format: ExportFormat  # the file's format
    out: str  # the file to write


def main(argv: list[str] | None = None) -> int:
    config = parse(ExportConfig, argv, "ranking export", __doc__.split("\n\n")[0], config_file=False)
    model = inference.load(Path(config.run), device="cpu")
    path = model.export(Path(config.out), config.format)
    pre = model.preprocessing
    print(f"wrote {path}: {config.format}, input float32 [N, 3, {pre.image_size}, {pre.image_size}] normalised with "
          f"mean {list(pre.mean)} std {list(pre.std)}, output [N, {model.dim}]")
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.export")
