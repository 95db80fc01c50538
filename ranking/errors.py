"""The one exception type users see, and the exit codes every entry point (CLI, launchers, sbatch) agrees on."""

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a RankingError: one line on stderr
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request after checkpointing, so a launcher requeues the job
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # `ranking search ... | head`: the reader left


class RankingError(Exception):
    """Bad input at a boundary (path, archive, shard, config, checkpoint, image); the message names the file."""


class ConfigError(RankingError):
    """A config file or flag that cannot be used; the message names the file and the problem."""

