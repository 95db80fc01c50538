"""`ranking export RUN --format onnx|torchscript|safetensors --out FILE`: the embedding network alone, for serving.

The exported network maps preprocessed images, float32 [N, 3, S, S], to embeddings [N, D] (L2-normalised if the run
normalises). The file's metadata (ONNX metadata_props, TorchScript's extra file metadata.json, safetensors' header)
holds model.json, as an index folder's: the model's identity (backbone, embed_dim, normalize, image_size S, mean,
std, the resize rule) and the checkpoint it came from. RUN is a run folder, a checkpoint folder or an index folder.

FILE's extension must be its format's (.onnx; .pt, .pts or .torchscript; .safetensors). An existing FILE is only
replaced with --overwrite, and never a run's or an index's own files (a checkpoint's state.pt, say).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ranking import cli
from ranking.core.config import ExportFormat
from ranking.core.errors import RankingError
from ranking.core.files import check_output_file
from ranking.core.flags import parse
from ranking.folders import checkpoint, runfolder
from ranking.retrieval import inference


@dataclass
class ExportConfig:
    run: str = field(metadata={"positional": True})  # a run folder (its latest checkpoint), checkpoint or index folder

    # output
    format: ExportFormat  # the file's format
    out: str  # the file to write (its extension: the format's)
    overwrite: bool = False  # replace an existing --out file


EXTENSIONS: dict[str, tuple[str, ...]] = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".pts", ".torchscript"),
    "safetensors": (".safetensors",),
}


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Before the model loads: the extension is the format's, the file can be written, and it is not a file of a
    checkpoint, a run or an index folder (which other stages read and verify)."""
    if out.is_dir():
        raise RankingError(f"{out}: --out is a folder; give a file name in it")
    if out.suffix.lower() not in EXTENSIONS[fmt]:
        raise RankingError(
            f"{out}: --format {fmt} writes a {' or '.join(EXTENSIONS[fmt])} file; name --out so "
            "(a file's extension says what reads it)"
        )
    folder = out.parent.resolve()
    owned = any(
        os.path.lexists(folder / marker) for marker in (runfolder.STATE, checkpoint.MANIFEST, inference.MODEL_JSON)
    )
    if owned or (folder.name == runfolder.CHECKPOINTS and (folder.parent / runfolder.CONFIG).exists()):
        raise RankingError(
            f"{out}: --out is in {folder}, a checkpoint or index folder whose files other stages "
            "read and verify; export beside it (the run folder itself is fine)"
        )
    check_output_file(out, "--out", overwrite)


def main(argv: list[str] | None = None) -> int:
    config = parse(ExportConfig, argv, "ranking export", __doc__.split("\n\n")[0], config_file=False)
    out = Path(config.out)
    check_out(out, config.format, config.overwrite)
    model = inference.load(Path(config.run), device="cpu")
    try:
        path = model.export(out, config.format)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing is left half-written
        raise RankingError(f"{out}: cannot write ({e.strerror or e})") from None
    spec = model.spec
    print(
        f"wrote {path}: {config.format}, input float32 [N, 3, {spec.image_size}, {spec.image_size}] normalised "
        f"with mean {list(spec.mean)} std {list(spec.std)}, output [N, {model.dim}]"
    )
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.export")
