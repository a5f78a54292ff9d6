"""The worker thread: batching concurrent jobs, isolating failures, queue limits, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from mmjobs.eval.generate import PromptInput, load_for_inference
from mmjobs.serve.batching import (
    BatchWorker,
    Job,
    QueueFullError,
    StreamChannel,
    WorkerStoppedError,
)
from mmjobs.serve.engine import Settings


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir))


def job(k: int, max_new_tokens: int = 6) -> Job:
    image = Image.new("RGB", (40, 40), (k * 40 % 256, 80, 160))
    return Job(PromptInput(f"<image>\nQuestion {k}?", [image]), Settings.make(max_new_tokens))


def test_queued_jobs_share_generate_calls(loaded):
    worker = BatchWorker(loaded, max_batch_size=4, batch_wait_ms=50)
    jobs = [job(k) for k in range(6)] + [job(9, max_new_tokens=3)]  # other settings: own call
    for j in jobs:  # queued before the worker starts, so the batches are deterministic
        worker.submit(j)
    worker.start()
    try:
        results = [j.future.result(timeout=120) for j in jobs]
        alone = BatchWorker(loaded, max_batch_size=1, batch_wait_ms=0).start()
        try:
            singles = [alone.submit(job(k)).result(timeout=120) for k in range(6)]
        finally:
            alone.stop()
    finally:
        worker.stop()
    assert [r.text for r in results[:6]] == [r.text for r in singles]
    assert results[6].completion_tokens <= 3
    # 4 + 2 with six-token settings, 1 with three-token settings.
    assert worker.metrics.batch_size.count() == 3
    assert worker.metrics.generated_tokens.total() == sum(r.completion_tokens for r in results)


def test_a_failing_prompt_does_not_fail_its_batch(loaded):
    worker = BatchWorker(loaded, max_batch_size=4, batch_wait_ms=50)
    bad = Job(PromptInput("<image>\nNo image attached", []), Settings.make(6))
    good = [job(1), job(2)]
    for j in (good[0], bad, good[1]):
        worker.submit(j)
    worker.start()
    try:
        assert all(j.future.result(timeout=120).completion_tokens > 0 for j in good)
        with pytest.raises(Exception):  # noqa: B017 - the processor's own error type
            bad.future.result(timeout=120)
    finally:
        worker.stop()


def test_full_queue_and_shutdown(loaded):
    worker = BatchWorker(loaded, max_queue=2)
    waiting = [worker.submit(job(1)), worker.submit(job(2))]
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        worker.submit(job(3))
    worker.start()
    worker.stop()
    for future in waiting:  # either answered before the stop, or failed by it
        assert future.done()
        if future.exception() is not None:
            assert isinstance(future.exception(), WorkerStoppedError)
    with pytest.raises(WorkerStoppedError):
        worker.submit(job(4))


def test_cancelled_jobs_are_skipped_and_streams_report_events(loaded):
    async def scenario() -> list[tuple[str, object]]:
        worker = BatchWorker(loaded, batch_wait_ms=0)
        skipped = job(1)
        skipped.cancelled.set()
        streamed = job(2)
        streamed.channel = StreamChannel(asyncio.get_running_loop())
        worker.submit(skipped)
        worker.submit(streamed)
        worker.start()
        events = []
        try:
            while True:
                kind, value = await asyncio.wait_for(streamed.channel.queue.get(), 120)
                events.append((kind, value))
                if kind != "delta":
                    break
        finally:
            worker.stop()
        assert not skipped.future.done() or skipped.future.cancelled()
        return events

    events = asyncio.run(scenario())
    assert events[-1][0] == "done"
    assert "".join(v for k, v in events if k == "delta") == events[-1][1].text
