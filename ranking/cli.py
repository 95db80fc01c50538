"""`ranking SUBCOMMAND ...`: one subcommand per stage; each stage module owns its flags through `main(argv)`."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from ranking import __version__
from ranking.core.errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, RankingError

SUBCOMMANDS = {
    "synth": ("ranking.synth", "write a procedurally generated archive in the official Tiny ImageNet layout"),
    "shards": ("ranking.shards", "repack tiny-imagenet-200.zip (or its folder) into WebDataset shards"),
    "train": ("ranking.train", "train the embedding (one process; use `accelerate launch -m ranking.train` for DDP)"),
    "evaluate": ("ranking.evaluate", "embed gallery and queries, compute retrieval metrics"),
    "report": ("ranking.report", "plots, ranked-result grids and the precision table of a run"),
    "search": ("ranking.search", "nearest gallery images for query images (an index or an evaluation folder)"),
    "index": ("ranking.index", "a portable index of your own images: model, embeddings, thumbnails"),
    "serve": ("ranking.serve", "an HTTP search service and web page over an index folder (the model loaded once)"),
    "dedup": ("ranking.dedup", "groups of near-duplicate images in an index folder (JSON, and a picture of them)"),
    "export": ("ranking.export", "the embedding network as ONNX, TorchScript or safetensors"),
    "compare": ("ranking.compare", "runs side by side: differing config keys, final and best metrics, overlaid curves"),
    "demo": ("ranking.demo", "the whole pipeline on embedded synthetic data"),
}


def usage() -> str:
    lines = ["usage: ranking SUBCOMMAND [options]   (ranking SUBCOMMAND --help for its options; ranking --version)", ""]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else EXIT_BAD_INPUT)
    if argv[0] == "--version":
        print(f"ranking (deep-ranking) {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ranking: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    run_stage(module.main, rest, f"ranking {name}")


def report_bad_input(line: str, on_every_rank: bool, started: float) -> None:
    """Print a bad input's line once per launch: on rank 0, or on the rank that alone saw it.

    Under ``accelerate launch`` (torchrun) every rank exits 2 and the launcher then prints its own traceback and a
    ChildFailedError summary; torchrun reads a failed rank's ``TORCHELASTIC_ERROR_FILE``, so rank 0 writes the line
    there and the summary's root cause shows it instead of "To enable traceback see ...".
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0 and on_every_rank:
        return
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and rank == 0:
        try:
            with open(error_file, "w") as f:  # torchelastic's format; its timestamp makes rank 0 the root cause
                json.dump({"message": line, "timestamp": int(started)}, f)
        except OSError:
            pass


def exit_bad_input() -> NoReturn:
    """Exit 2 on every rank of a launch. torchrun stops the other ranks (SIGTERM) as soon as one has exited, so the
    ranks other than 0 give rank 0 a few seconds to go first, and every rank answers that SIGTERM with 2 as well."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(EXIT_BAD_INPUT))
        if int(os.environ.get("RANK", "0") or 0) != 0:
            time.sleep(5)
    sys.exit(EXIT_BAD_INPUT)


def run_stage(stage_main: Callable[[list[str]], int | None], argv: list[str], prog: str) -> NoReturn:
    """Run a stage's main; a RankingError (or a permission denied on a path) becomes one line on stderr and exit
    status 2, printed once per launch."""
    started = time.time()
    try:
        code = stage_main(argv)
    except RankingError as e:
        report_bad_input(f"{prog}: error: {e}", e.on_every_rank, started)
        exit_bad_input()
    except PermissionError as e:
        report_bad_input(f"{prog}: error: {e.filename or ''}: {e.strerror}", False, started)
        exit_bad_input()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `ranking search ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
