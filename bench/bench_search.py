"""Search latency of a portable index: one query image against a 100k gallery, cold start and warm.

    python bench/bench_search.py                      # 100,000 rows, the default model (Lite0, 160 px, 128-d)
    python bench/bench_search.py --gallery 10000 --backbone resnet18 --image-size 32 --dim 16

Writes an index folder (``ranking.retrieval.indexfolder.write_index``) whose model is the chosen architecture with
random weights (the speed does not depend on the weights) and whose rows are seeded random unit vectors with synthetic
items (no thumbnails: they are not read by a search). Then a fresh Python process, as a user's would be, measures:

- cold start: ``import ranking``, ``ranking.Index.load(INDEX)`` and the first search of one JPEG, each timed, and the
  process's wall time from its start (interpreter start-up included);
- warm query: ``index.search([image], k)`` repeated on the loaded index: median and 90th percentile, split into the
  embedding of the image and the search of the gallery.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = r"""
import json, sys, time
started = time.perf_counter()
import ranking
imported = time.perf_counter()
index = ranking.Index.load(sys.argv[1], device="cpu")
loaded = time.perf_counter()
first = index.search([sys.argv[2]], k=int(sys.argv[3]))
searched = time.perf_counter()
answered_at = time.time()
from PIL import Image
image = Image.open(sys.argv[2]).convert("RGB")
total, embed, search = [], [], []
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    vector = index.model.embed([image])
    t1 = time.perf_counter()
    results = index.search_embeddings(vector, int(sys.argv[3]))
    t2 = time.perf_counter()
    total.append(t2 - t0); embed.append(t1 - t0); search.append(t2 - t1)
assert results[0][0].item.id == first[0][0].item.id
import torch
print(json.dumps({"threads": torch.get_num_threads(),
                  "answered_at": answered_at,
                  "import_s": imported - started, "load_s": loaded - imported, "first_query_s": searched - loaded,
                  "total": total, "embed": embed, "search": search, "rows": len(index), "dim": index.dim}))
"""


def build_index(out: Path, gallery: int, backbone: str, image_size: int, dim: int, seed: int) -> None:
    import torch
    import torch.nn.functional as F

    from ranking.learning.models import ModelSpec, build_model
    from ranking.retrieval.indexfolder import ImageSource, write_index
    from ranking.retrieval.inference import EmbeddingModel, weights_sha256

    class Synthetic(ImageSource):
        kind = "synthetic"

        def __init__(self) -> None:
            self.path = out
            self.entries = [(i % 200, f"class{i % 200:03d}", None, f"synthetic/{i:07d}.jpg") for i in range(gallery)]

        def images(self):
            return iter(())

    spec = ModelSpec(backbone=backbone, image_size=image_size, embed_dim=dim)
    torch.manual_seed(seed)
    net = build_model(spec).eval()
    model = EmbeddingModel(
        net, spec, {"run_dir": "bench", "step": 0, "weights_sha256": weights_sha256(net.state_dict())}, device="cpu"
    )
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(gallery, dim, generator=generator), dim=1)
    write_index(out, model, [Synthetic()], [embeddings])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of the searching process (OMP_NUM_THREADS; 0: torch's default). "
        "On CPUs shared with other work, 1 thread answers one image fastest",
    )
    parser.add_argument("--index", type=Path, default=None, help="keep the index here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.index or Path(tmp) / "index"
        started = time.perf_counter()
        build_index(out, args.gallery, args.backbone, args.image_size, args.dim, seed=0)
        built = time.perf_counter() - started
        from PIL import Image

        query = Path(tmp) / "query.jpg"
        Image.radial_gradient("L").convert("RGB").resize((300, 200)).save(query)  # a photo-sized JPEG
        size = sum(p.stat().st_size for p in out.iterdir())
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        began = time.time()
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(out), str(query), str(args.k), str(args.repeats)],
            capture_output=True,
            text=True,
            env=env,
        )
        if probe.returncode:
            sys.exit(probe.stderr)
        r = json.loads(probe.stdout)
        wall = r["answered_at"] - began

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(
        f"index: {r['rows']} rows x {r['dim']}-d, {args.backbone} at {args.image_size} px, {size / 2**20:.1f} MiB "
        f"on disk (built in {built:.1f} s); searching with {r['threads']} torch thread(s), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"cold start: {wall:.2f} s from starting a fresh process to its first answer (import ranking "
        f"{r['import_s']:.2f} s, Index.load {r['load_s']:.2f} s, first search {r['first_query_s']:.2f} s)"
    )
    print(
        f"warm query (k={args.k}, {args.repeats} repeats): median {ms(r['total'], 0.5):.1f} ms, p90 "
        f"{ms(r['total'], 0.9):.1f} ms (embed the image {ms(r['embed'], 0.5):.1f} ms, search the gallery "
        f"{ms(r['search'], 0.5):.1f} ms)"
    )
    print(f"target: warm query under 500 ms: {'met' if ms(r['total'], 0.9) < 500 else 'MISSED'}")


if __name__ == "__main__":
    main()
