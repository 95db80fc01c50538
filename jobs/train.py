"""Submit training with submitit; a requeued or resubmitted job resumes the run (``--resume latest``).

python -m jobs.train --nodes 2 --gpus-per-node 8 --shards DIR --run-dir DIR [-- train flags]
"""

from __future__ import annotations

import sys

from jobs.common import TrainTask, parse, parser, run, with_resume
from ranking import cli


def main(argv: list[str] | None = None) -> int:
    p = parser("train", __doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="folder written by `ranking shards`")
    p.add_argument(
        "--run-dir",
        required=True,
        help="run folder; resumed from its newest intact checkpoint, started when it has none",
    )
    launch, args, train_flags = parse(p, sys.argv[1:] if argv is None else argv)
    train_argv = ["--shards", args.shards, "--run-dir", args.run_dir, *train_flags]
    # --resume latest continues from the newest intact checkpoint and starts a run that has none yet (a first start,
    # a job killed before its first checkpoint); a --resume or --overwrite of the user's is kept as given
    if not any(flag in ("--resume", "--overwrite") or flag.startswith("--resume=") for flag in train_flags):
        train_argv = with_resume(train_argv)
    return run("train", TrainTask("ranking.train", train_argv, use_cpu=launch.gpus_per_node == 0), launch)


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "jobs.train")
