"""One worker thread owns the model; concurrent requests are batched into shared `generate` calls.

    worker = BatchWorker(loaded, max_batch_size=8, batch_wait_ms=10, max_queue=256)
    worker.start()
    future = worker.submit(Job(prompt, Settings.make(64)))     # non-streaming
    result = future.result()                                   # GenerationResult

Why one thread: a model on one device runs one forward pass at a time anyway, and a single
owner means no locks around the model, the tokenizer (whose padding side `Generator` sets) or
the RNG. The worker takes the oldest job; for a non-streaming job it keeps collecting more
non-streaming jobs until `max_batch_size` are waiting or `batch_wait_ms` has passed since
the queue ran dry, then runs each group of equal generation settings as one padded batch.
Streaming jobs run alone (a streamer follows one row), in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, Full, Queue
from typing import Any

from mmjobs.eval.generate import PromptInput
from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel
from mmjobs.serve.engine import GenerationResult, ServeGenerator, Settings
from mmjobs.serve.metrics import ServeMetrics

__all__ = ["BatchWorker", "Job", "QueueFullError", "StreamChannel", "WorkerStoppedError"]

log = get_logger(__name__)
_STOP = object()
_GENERATOR_CACHE = 16  # distinct settings kept ready; building one is cheap, so a small LRU


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queue`."""


class WorkerStoppedError(RuntimeError):
    """The server is shutting down; the job was not run."""


class StreamChannel:
    """Events from the worker thread to a request's event loop: ("delta", str),
    ("done", GenerationResult) or ("error", Exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, kind: str, value: Any) -> None:
        # RuntimeError: the loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


@dataclass
class Job:
    """One request for the worker.

    Attributes:
        prompt: the conversation and its decoded images.
        settings: generation settings; jobs with equal settings can share a batch.
        channel: set for streaming jobs (results arrive as events, not on `future`).
        cancelled: set by the request when its client goes away; the job is skipped, or its
            row of the batch stops at the next token while the other rows go on.
    """

    prompt: PromptInput
    settings: Settings
    channel: StreamChannel | None = None
    future: Future[GenerationResult] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)


class BatchWorker:
    """The generation thread (see the module docstring).

    Args:
        loaded: the model and processor.
        max_batch_size: most requests in one `generate` call.
        batch_wait_ms: how long to wait for more requests once the queue is empty.
        max_queue: most requests waiting; `submit` raises `QueueFullError` beyond it.
        metrics: where batch sizes, token counts and the queue depth go.
    """

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8,
                 batch_wait_ms: float = 10.0, max_queue: int = 256,
                 metrics: ServeMetrics | None = None) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.metrics = metrics or ServeMetrics()
        self._queue: Queue[Any] = Queue(maxsize=max_queue)
        self._generators: OrderedDict[Settings, ServeGenerator] = OrderedDict()
        self._thread = threading.Thread(target=self._loop, name="mmjobs-serve-worker",
                                        daemon=True)
        self._stopping = threading.Event()
        # Built now, on the caller's thread, so a model that cannot generate fails at startup.
        self.takes_images = self._generator(Settings.make(1)).takes_images

    def start(self) -> BatchWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the waiting jobs with `WorkerStoppedError`, join."""
        self._stopping.set()
        while True:  # emptied first, so the stop marker always fits
            try:
                job = self._queue.get_nowait()
            except Empty:
                break
            if job is not _STOP:
                self._fail(job, WorkerStoppedError("the server is shutting down"))
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> Future[GenerationResult]:
        """Queue a job; returns its future (streaming jobs also report on their channel).

        Raises:
            QueueFullError: `max_queue` jobs are already waiting.
            WorkerStoppedError: the worker is stopping.
        """
        if self._stopping.is_set():
            raise WorkerStoppedError("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except Full:
            raise QueueFullError(f"{self._queue.maxsize} requests are already waiting") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    # ------------------------------------------------------------------------- worker thread

    def _loop(self) -> None:
        held: collections.deque[Any] = collections.deque()  # taken while batching, run next
        while True:
            job = held.popleft() if held else self._queue.get()
            if job is _STOP:
                for waiting in (j for j in held if j is not _STOP):
                    self._fail(waiting, WorkerStoppedError("the server is shutting down"))
                return
            if job.channel is not None:
                self._run_stream(job)
                continue
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except Empty:
                    break
                if nxt is _STOP or nxt.channel is not None:
                    held.append(nxt)
                    if nxt is _STOP:
                        break
                    continue
                batch.append(nxt)
            self.metrics.queue_depth.set(self._queue.qsize())
            self._run_batch(batch)

    def _generator(self, settings: Settings) -> ServeGenerator:
        gen = self._generators.pop(settings, None)
        if gen is None:
            gen = ServeGenerator(self.loaded, batch_size=self.max_batch_size,
                                 max_new_tokens=settings.max_new_tokens,
                                 do_sample=settings.do_sample,
                                 temperature=settings.temperature or 1.0,
                                 top_p=settings.top_p, stop_strings=settings.stop)
        self._generators[settings] = gen
        while len(self._generators) > _GENERATOR_CACHE:
            self._generators.popitem(last=False)
        # Sampling without a client seed must not repeat itself request after request.
        gen.seed = settings.seed if settings.seed is not None else random.getrandbits(31)
        return gen

    def _run_batch(self, batch: list[Job]) -> None:
        # Claim each future first: one the client already cancelled is dropped here.
        live = [j for j in batch if not j.cancelled.is_set()
                and j.future.set_running_or_notify_cancel()]
        if skipped := len(batch) - len(live):
            self.metrics.cancelled.inc(skipped)
        groups: dict[Settings, list[Job]] = {}
        for job in live:
            groups.setdefault(job.settings, []).append(job)
        for settings, jobs in groups.items():
            self.metrics.running.set(len(jobs))
            try:
                results = self._generator(settings).run([j.prompt for j in jobs],
                                                        [j.cancelled for j in jobs])
            except Exception as e:
                if len(jobs) == 1:
                    log.exception("generation failed")
                    self._fail(jobs[0], e)
                    continue
                # One bad prompt must not fail its neighbours: retry each alone to find it.
                log.warning("a batch of %d failed (%s); retrying one at a time", len(jobs), e)
                for job in jobs:
                    try:
                        self._finish(job, self._generator(settings).run(
                            [job.prompt], [job.cancelled])[0], 1)
                    except Exception as err:
                        log.exception("generation failed")
                        self._fail(job, err)
                continue
            finally:
                self.metrics.running.set(0)
            self.metrics.batch_size.observe(len(jobs))
            for job, result in zip(jobs, results, strict=True):
                self._finish(job, result, None)

    def _run_stream(self, job: Job) -> None:
        channel = job.channel
        if (channel is None or job.cancelled.is_set()
                or not job.future.set_running_or_notify_cancel()):
            self.metrics.cancelled.inc()
            return
        self.metrics.running.set(1)
        try:
            result = self._generator(job.settings).stream(
                job.prompt, lambda delta: channel.put("delta", delta), job.cancelled)
        except Exception as e:
            log.exception("streamed generation failed")
            self._fail(job, e)
            return
        finally:
            self.metrics.running.set(0)
        self._finish(job, result, 1)

    def _finish(self, job: Job, result: GenerationResult, batch_size: int | None) -> None:
        if batch_size is not None:
            self.metrics.batch_size.observe(batch_size)
        if job.cancelled.is_set():  # its client left while it ran: its row stopped early
            self.metrics.cancelled.inc()
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.generated_tokens.inc(result.completion_tokens)
        if job.channel is not None:
            job.channel.put("done", result)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.channel is not None:
            job.channel.put("error", error)
        # A future still PENDING must be claimed before it can take an exception.
        if not job.future.done() and (job.future.running()
                                      or job.future.set_running_or_notify_cancel()):
            job.future.set_exception(error)
