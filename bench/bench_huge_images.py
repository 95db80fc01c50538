"""Peak memory of `ranking index` and `ranking search` on huge photos (issue 22, finding 4): each image is now
decoded reduced to the model's image size (``decode.decode_image(..., shorter_side)``), so N photos of SxS pixels
stay small. Runs both commands under ``/usr/bin/time -v`` and prints their maximum resident set size, for this
checkout and, with --compare, for another one (the code before the change, say).

    python bench/bench_huge_images.py [--count 12] [--size 8000] [--compare ../other-checkout]

It writes a smoke run (random ResNet-18 weights, 32 px), COUNT smooth JPEGs of SIZE x SIZE (a photo's size on disk,
under the 16 MiB file limit) and an index of them, in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for n in range(count):
        rng = np.random.default_rng(n)
        tile = rng.integers(0, 255, (size // 64 + 1, size // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR)  # smooth, like a photo
        pixels = np.asarray(image, dtype=np.float32) * 0.7 + ramp[None, :, None] * 0.3
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"photo-{n:02d}.jpg", quality=85)


def peak_rss_mib(command: list[str], pythonpath: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True, cwd=pythonpath
    )  # python -m puts the current folder first on sys.path
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return int(found.group(1)) / 1024, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--compare", type=Path, help="another checkout to measure the same way (its PYTHONPATH)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from harness import write_smoke_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = write_smoke_run(root / "run", str(root), image_size=32, embed_dim=16)
        photos = root / "photos"
        write_photos(photos, args.count, args.size)
        megabytes = sum(p.stat().st_size for p in photos.iterdir()) / 2**20
        print(f"{args.count} JPEGs of {args.size}x{args.size} ({megabytes:.0f} MiB on disk)")
        checkouts = [REPO] + ([args.compare.resolve()] if args.compare else [])
        for checkout in checkouts:
            index = root / f"index-{checkouts.index(checkout)}"
            python = [sys.executable, "-m", "ranking"]
            built, _ = peak_rss_mib(
                python
                + [
                    "index",
                    "--checkpoint",
                    str(run),
                    "--images",
                    str(photos),
                    "--out",
                    str(index),
                    "--batch-size",
                    str(args.count),
                ],
                checkout,
            )
            searched, _ = peak_rss_mib(
                python
                + [
                    "search",
                    *map(str, sorted(photos.iterdir())),
                    "--index",
                    str(index),
                    "--device",
                    "cpu",
                    "--top",
                    "1",
                ],
                checkout,
            )
            print(f"{checkout}: peak RSS  index {built:7.0f} MiB   search {searched:7.0f} MiB")


if __name__ == "__main__":
    main()
