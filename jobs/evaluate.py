"""Submit an evaluation with submitit, embedding on all GPUs of all nodes.

python -m jobs.evaluate --gpus-per-node 8 --checkpoint RUN_DIR [--shards DIR] [--out DIR] [-- evaluate flags]
"""

from __future__ import annotations

import sys

from jobs.common import StageTask, parse, parser, run
from ranking import cli


def main(argv: list[str] | None = None) -> int:
    p = parser("evaluate", __doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--shards", default="", help="default: the shards the run was trained on")
    p.add_argument("--out", default="", help="default: RUN_DIR/eval-STEP")
    launch, args, eval_flags = parse(p, sys.argv[1:] if argv is None else argv)
    eval_argv = ["--checkpoint", args.checkpoint]
    eval_argv += ["--shards", args.shards] if args.shards else []
    eval_argv += ["--out", args.out] if args.out else []
    task = StageTask("ranking.evaluate", [*eval_argv, *eval_flags], use_cpu=launch.gpus_per_node == 0)
    return run("evaluate", task, launch)


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "jobs.evaluate")
