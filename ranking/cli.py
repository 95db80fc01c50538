"""`ranking SUBCOMMAND ...`: one subcommand per stage; each stage module owns its flags through `main(argv)`."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from ranking.errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, RankingError

SUBCOMMANDS = {
    "synth": ("ranking.synth", "write a procedurally generated archive in the official Tiny ImageNet layout"),
    "shards": ("ranking.shards", "repack tiny-imagenet-200.zip (or its folder) into WebDataset shards"),
    "train": ("ranking.train", "train the embedding (one process; use `accelerate launch -m ranking.train` for DDP)"),
    "evaluate": ("ranking.evaluate", "embed gallery and queries, compute retrieval metrics"),
    "report": ("ranking.report", "plots, ranked-result grids and the precision table of a run"),
    "search": ("ranking.search", "nearest gallery images for query images"),
    "demo": ("ranking.demo", "the whole pipeline on embedded synthetic data"),
}


def usage() -> str:
    lines = ["usage: ranking SUBCOMMAND [options]   (ranking SUBCOMMAND --help for its options)", ""]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else EXIT_BAD_INPUT)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ranking: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    run_stage(module.main, rest, f"ranking {name}")


def run_stage(stage_main: Callable[[list[str]], int | None], argv: list[str], prog: str) -> NoReturn:
    """Run a stage's main; a RankingError becomes one line on stderr and exit status 2."""
    try:
        code = stage_main(argv)
    except RankingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `ranking search ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
