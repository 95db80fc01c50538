"""Submit the repacking of Tiny ImageNet into WebDataset shards (one CPU task) with submitit.

python -m jobs.shards SOURCE --out DIR [--cpus-per-task 16] [-- shards flags]
"""

from __future__ import annotations

import dataclasses
import sys

from jobs.common import StageTask, parse, parser, run
from ranking import cli


def main(argv: list[str] | None = None) -> int:
    p = parser("shards", __doc__.splitlines()[0])
    p.add_argument("source", help="tiny-imagenet-200.zip or its extracted folder")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    launch, args, shard_flags = parse(p, sys.argv[1:] if argv is None else argv)
    launch = dataclasses.replace(launch, nodes=1, gpus_per_node=0, tasks_per_node=1)
    task = StageTask("ranking.shards", [args.source, "--out", args.out, *shard_flags], use_cpu=True)
    return run("shards", task, launch)


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "jobs.shards")
