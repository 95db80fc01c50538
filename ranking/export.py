"""`ranking export RUN --format onnx|torchscript|safetensors --out FILE`: the embedding network alone, for serving.

The exported network maps preprocessed images, float32 [N, 3, S, S], to embeddings [N, D] (L2-normalised if the run
normalises). The file's metadata (ONNX metadata_props, TorchScript's extra file metadata.json, safetensors' header)
holds model.json, as an index folder's: the model's identity (backbone, embed_dim, normalize, image_size S, mean,
std, the resize rule) and the checkpoint it came from. RUN is a run folder, a checkpoint folder or an index folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ranking import cli
from ranking.retrieval import inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ranking export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="run folder, checkpoint folder or index folder")
    parser.add_argument("--format", choices=inference.EXPORT_FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    args = parser.parse_args(argv)
    model = inference.load(args.model, device="cpu")
    path = model.export(args.out, args.format)
    spec = model.spec
    print(f"wrote {path}: {args.format}, input float32 [N, 3, {spec.image_size}, {spec.image_size}] normalised with "
          f"mean {list(spec.mean)} std {list(spec.std)}, output [N, {model.dim}]")
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.export")
