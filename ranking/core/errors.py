"""The one exception type users see, and the exit codes every entry point (CLI, launchers, sbatch) agrees on."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a RankingError: one line on stderr
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request after checkpointing, so a launcher requeues the job
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # `ranking search ... | head`: the reader left


class RankingError(Exception):
    """Bad input at a boundary (path, archive, shard, config, checkpoint, image); the message names the file.

    ``on_every_rank``: every rank of a launch raises this same error (a bad flag, or rank 0's checks broadcast), so
    only rank 0 prints it; otherwise each rank that raises it prints it.
    """

    on_every_rank = False

    def everywhere(self) -> RankingError:
        self.on_every_rank = True
        return self


class ConfigError(RankingError):
    """A config file or flag that cannot be used; the message names the file and the problem."""

    on_every_rank = True  # every rank reads the same flags and files
