"""Queries that arrive together share one forward pass: ``QueryBatcher`` (used by ``ranking serve``).

Each query waits in a bounded asyncio queue; one worker takes every query waiting (up to ``max_batch``; after a batch
of several, it waits up to ``gather_s`` for as many again), embeds their images in one batch and searches the index
once for all of them, on a single thread of its own (the model and the search are never run by two threads at once).
A full queue refuses at once (``QueueFull``) instead of growing: the caller answers 503 and the client retries later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ranking.retrieval.indexfolder import Index, Result


class QueueFull(Exception):
    """The queue of waiting queries is full: come back later."""


@dataclass
class Pending:
    # makes the query's uint8 [3, H, W] image on the worker's thread (decoding an upload), or None: search by the
    # stored row ``row``; what it raises answers this query alone
    image: Callable[[], torch.Tensor] | None
    row: int
    k: int
    answer: asyncio.Future[list[Result]]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    queries: int = 0
    largest: int = 0
    refused: int = 0


class QueryBatcher:
    def __init__(self, index: Index, max_batch: int = 16, queue_size: int = 64, gather_s: float = 0.005):
        self.index = index
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.last_batch = 1
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_size)
        self.stats = BatchStats()
        # one thread runs the model and the search: torch's own threads do the parallel work
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranking-search")
        self.worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def search_image(self, image: Callable[[], torch.Tensor], k: int) -> list[Result]:
        """The nearest rows of the image ``image()`` makes (called on the worker's thread: an upload is decoded
        there, so a query costs one hand-over between threads, not two)."""
        return await self._submit(image, -1, k)

    async def search_row(self, row: int, k: int) -> list[Result]:
        """The nearest rows of the stored row ``row`` ("more like this": no forward pass)."""
        return await self._submit(None, row, k)

    async def _submit(self, image: Callable[[], torch.Tensor] | None, row: int, k: int) -> list[Result]:
        answer: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Pending(image, row, k, answer))
        except asyncio.QueueFull:
            self.stats.refused += 1
            raise QueueFull(f"{self.queue.maxsize} queries already waiting") from None
        return await answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            # Clients answered together ask again together, but not at the same instant: the first to ask would go
            # through alone and the rest wait a whole forward pass for the next. So after a batch of several, wait
            # up to gather_s for as many; a lone client (batches of one) never waits.
            expected = min(self.max_batch, self.last_batch)
            deadline = loop.time() + self.gather_s
            while len(batch) < expected and (remaining := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.last_batch = len(batch)
            batch = [p for p in batch if not p.answer.done()]  # a client that left (cancelled) costs nothing
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.queries += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            try:
                found = await loop.run_in_executor(self.executor, self._search, batch)
            except Exception as e:  # noqa: BLE001 - each waiting client gets the error; the worker goes on
                found = [e] * len(batch)
            for pending, answer in zip(batch, found):
                if pending.answer.done():
                    continue
                if isinstance(answer, Exception):
                    pending.answer.set_exception(answer)
                else:
                    pending.answer.set_result(answer)

    def _search(self, batch: list[Pending]) -> list[list[Result] | Exception]:
        """Each query's image made, then one forward pass for every image of the batch and one search for every
        query; a query whose image cannot be made gets its exception, the others their results."""
        answers: list[list[Result] | Exception | None] = [None] * len(batch)
        images: dict[int, torch.Tensor] = {}
        for n, pending in enumerate(batch):
            if pending.image is not None:
                try:
                    images[n] = pending.image()
                except Exception as e:  # noqa: BLE001 - this query's bad input, answered to it alone
                    answers[n] = e
        embedded = (
            dict(zip(images, self.index.model.embed(list(images.values()), batch_size=len(images)))) if images else {}
        )
        searched = [n for n, answer in enumerate(answers) if answer is None]
        if searched:
            queries = torch.stack(
                [embedded[n] if n in embedded else self.index.embeddings[batch[n].row].cpu() for n in searched]
            )
            found = self.index.search_embeddings(queries, max(batch[n].k for n in searched))
            for n, results in zip(searched, found):
                answers[n] = results[: batch[n].k]
        return [answer if answer is not None else RuntimeError("unanswered") for answer in answers]
