"""`ranking serve` against the in-process search: one query's latency over HTTP, and throughput with concurrent clients.

    python bench/bench_serve.py                               # 100,000 rows, Lite0 at 160 px, 128-d, 1 thread
    python bench/bench_serve.py --gallery 10000 --backbone resnet18 --image-size 32 --dim 16 --seconds 5

Writes an index as bench_search.py does (random weights, seeded random rows, no thumbnails), then measures, with the
same number of torch threads (``--threads``) in both places:

- one query: ``ranking serve --index INDEX`` in its own process, ``POST /api/search`` of a JPEG from one client
  with a kept-alive connection, alternated with ``ranking.Index.load(INDEX).search([IMAGE], k)`` of the same file
  in this process (decoding included), so that both see the same load of a shared machine; medians (target: HTTP
  <= 1.2x in process);
- throughput: queries answered per second by 1 client and by ``--clients`` concurrent clients for ``--seconds``
  each (target: 8 clients >= 1.5x one client's rate), and the server's batch sizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_search import build_index


def median_ms(values: list[float]) -> float:
    return 1000 * sorted(values)[len(values) // 2]


def one_query(index_dir: Path, query: Path, url: str, k: int, repeats: int) -> tuple[list[float], list[float]]:
    """(in-process timings, HTTP timings), measured alternately."""
    import httpx

    import ranking

    index = ranking.Index.load(index_dir, device="cpu")
    jpeg = query.read_bytes()
    local, remote = [], []
    with httpx.Client(timeout=120) as client:
        for n in range(repeats + 2):  # the first two warm both
            started = time.perf_counter()
            index.search([query], k)
            middle = time.perf_counter()
            response = client.post(f"{url}/api/search", params={"k": k}, files={"image": ("q.jpg", jpeg)})
            response.raise_for_status()
            if n >= 2:
                local.append(middle - started)
                remote.append(time.perf_counter() - middle)
    return local, remote


def start_server(index_dir: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "ranking", "serve", "--index", str(index_dir), "--port", "0"]
    command += ["--threads", str(threads), "--queue-size", "256", "--max-batch", "16"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "http://" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"ranking serve did not start: {log.read_text()}")
        time.sleep(0.1)
    return process, "http://" + log.read_text().split("http://")[1].split()[0].rstrip("/")


def throughput(url: str, jpeg: bytes, k: int, clients: int, seconds: float) -> float:
    import httpx

    answered = [0] * clients
    stop_at = time.perf_counter() + seconds

    def client_loop(n: int) -> None:
        with httpx.Client(timeout=120) as client:
            while time.perf_counter() < stop_at:
                response = client.post(f"{url}/api/search", params={"k": k}, files={"image": ("q.jpg", jpeg)})
                response.raise_for_status()
                answered[n] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(answered) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", "--rows", type=int, default=100_000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in process and of the server")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15, help="each throughput measurement")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        build_index(index_dir, args.gallery, args.backbone, args.image_size, args.dim, seed=0)
        from PIL import Image

        query = Path(tmp) / "query.jpg"
        Image.radial_gradient("L").convert("RGB").resize((300, 200)).save(query)
        jpeg = query.read_bytes()
        process, url = start_server(index_dir, args.threads, Path(tmp) / "serve.log")
        try:
            local, remote = one_query(index_dir, query, url, args.k, args.repeats)
            one = throughput(url, jpeg, args.k, 1, args.seconds)
            many = throughput(url, jpeg, args.k, args.clients, args.seconds)
            import httpx

            batches = httpx.get(f"{url}/api/index").json()["batches"]
        finally:
            process.terminate()
            process.wait()

    print(
        f"index: {args.gallery} rows x {args.dim}-d, {args.backbone} at {args.image_size} px; {args.threads} torch "
        f"thread(s) in process and in the server; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    ratio = median_ms(remote) / median_ms(local)
    print(
        f"one query: in process {median_ms(local):.1f} ms median, over HTTP {median_ms(remote):.1f} ms median "
        f"= {ratio:.2f}x (target <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'})"
    )
    gain = many / one
    print(
        f"throughput: 1 client {one:.1f} queries/s, {args.clients} clients {many:.1f} queries/s = {gain:.2f}x "
        f"(target >= 1.5x: {'met' if gain >= 1.5 else 'MISSED'}); server: {batches['queries']} queries in "
        f"{batches['batches']} forward passes, largest batch {batches['largest']}"
    )


if __name__ == "__main__":
    main()
