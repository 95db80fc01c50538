"""Metric learning: the networks and their identity, distances, miners, losses, optimizers and schedules.
Imports ``ranking.core`` and ``ranking.folders``."""
