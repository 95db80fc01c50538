"""The on-disk contracts between stages: the shards folder's manifest, the run folder and its checkpoints.
Metadata and files only: no pixels, no networks. Imports ``ranking.core``."""
