"""ranking.data.decode (TorchCodec) against torchvision.io.decode_jpeg, the decoder the workers used before it: the
same uint8 on every JPEG of a Tiny ImageNet zip, and the time per image inside a DataLoader worker (one thread).

    python bench/bench_decode.py ../shared/data/tiny-imagenet-40cls.zip [--timed 5000] [--rounds 5]

Run it again before moving the torchcodec pin: the training stream's pixels must stay the same. (torchvision 0.29
deprecates its decoders; when it drops them, this comparison goes with them.)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset


def decoders() -> dict[str, Callable[[bytes], torch.Tensor]]:
    warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg

    from ranking.data.decode import decode_jpeg as ours

    def torchvision_decode(data: bytes) -> torch.Tensor:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return {"torchvision.io": torchvision_decode, "ranking.data.decode": ours}


class Timed(IterableDataset):
    """In a DataLoader worker: one warm-up decode, then the mean microseconds per image of ``name``'s decoder."""

    def __init__(self, jpegs: list[bytes], name: str):
        self.jpegs, self.name = jpegs, name

    def __iter__(self) -> Iterator[float]:
        torch.set_num_threads(1)
        decode = decoders()[self.name]
        decode(self.jpegs[0])
        started = time.perf_counter()
        for jpeg in self.jpegs:
            decode(jpeg)
        yield (time.perf_counter() - started) / len(self.jpegs) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", help="a Tiny ImageNet zip")
    parser.add_argument("--timed", type=int, default=5000, help="JPEGs in each timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each decoder, interleaved")
    args = parser.parse_args()
    with zipfile.ZipFile(args.zip) as z:
        jpegs = [z.read(name) for name in z.namelist() if name.lower().endswith((".jpeg", ".jpg"))]
    found = decoders()
    before, after = found["torchvision.io"], found["ranking.data.decode"]
    differ = sum(not torch.equal(before(jpeg), after(jpeg)) for jpeg in jpegs)
    print(f"{args.zip}: {len(jpegs)} JPEGs, {differ} decoded differently")
    times: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(args.rounds):
        for name in times:
            times[name] += DataLoader(Timed(jpegs[: args.timed], name), batch_size=None, num_workers=1)
    for name, found_times in times.items():
        print(
            f"{name}: median {statistics.median(found_times):.1f} us, best {min(found_times):.1f} us per image in a "
            f"worker ({args.rounds} rounds of {min(args.timed, len(jpegs))})"
        )
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
