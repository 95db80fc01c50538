"""Cross-batch memory (XBM, Wang et al., CVPR 2020): the embeddings of recent batches as extra pairs of a pair loss.

The memory holds the last ``size`` rows it was given (a ring), detached, with their labels. ``DistributedLoss``
gives it the batch of all ranks after the gather, so every rank holds the same memory without another collective,
and a pair loss (multi_similarity) compares each row of the batch with the batch and the memory. The memory is not
part of a checkpoint: a resumed run starts with an empty one and refills it in ``size / global batch`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


class CrossBatchMemory:
    def __init__(self, size: int, start_images: int = 0):
        self.size = size
        self.start_images = start_images  # rows enqueued before the memory is handed to the loss
        self.seen = 0  # rows enqueued so far
        self.embeddings: Tensor | None = None
        self.labels: Tensor | None = None

    def contents(self) -> tuple[Tensor, Tensor] | None:
        """The stored rows and labels (before this step's batch is added), or None while warming up or empty."""
        if self.embeddings is None or self.labels is None or self.seen < max(self.start_images, 1):
            return None
        filled = min(self.seen, self.size)
        return self.embeddings[:filled], self.labels[:filled]

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add a batch, overwriting the oldest rows once full (a batch larger than the memory keeps its last rows)."""
        embeddings, labels = embeddings.detach().float()[-self.size :], labels.detach()[-self.size :]
        if self.embeddings is None or self.labels is None:
            self.embeddings = embeddings.new_zeros(self.size, embeddings.shape[1])
            self.labels = labels.new_full((self.size,), -1)
        slots = (self.seen + torch.arange(len(labels), device=labels.device)) % self.size
        self.embeddings[slots.to(self.embeddings.device)] = embeddings
        self.labels[slots.to(self.labels.device)] = labels
        self.seen += len(labels)
