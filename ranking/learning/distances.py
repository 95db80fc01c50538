"""Squared Euclidean distances, the one measure of the whole project: the paper's D, the miners' and the metrics'.

Computed in float32 whatever the autocast dtype of the inputs, through one matrix product
(``||q||^2 + ||g||^2 - 2 q.g``, clamped at 0) for all pairs, or directly for the rows of paired tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def squared_norms(x: Tensor) -> Tensor:
    """Row norms squared, in float32, without materialising ``x ** 2`` (the gallery can be gigabytes)."""
    return torch.linalg.vector_norm(x.float(), dim=1).square()


def squared_distances(queries: Tensor, gallery: Tensor, gallery_sq_norms: Tensor | None = None) -> Tensor:
    """[Q, G] squared distances of every query to every gallery row; pass ``gallery_sq_norms`` to reuse them."""
    if gallery_sq_norms is None:
        gallery_sq_norms = squared_norms(gallery)
    queries = queries.float()
    distances = queries @ gallery.float().T
    distances.mul_(-2).add_(gallery_sq_norms).add_(squared_norms(queries)[:, None])
    return distances.clamp_min_(0)


def paired_squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """[N] squared distances between row i of ``a`` and row i of ``b`` (differentiable; the losses' D)."""
    return (a.float() - b.float()).pow(2).sum(dim=1)
