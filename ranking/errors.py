"""The one exception type users see: the CLI prints its message as a single line and exits with status 2."""


class RankingError(Exception):
    """Bad input at a boundary (path, archive, shard, config, checkpoint, image); the message names the file."""
