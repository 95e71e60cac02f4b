"""Dynamic batching: fewer model calls than requests, each request its own answer, 503 and 504."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from beit3.pipelines import pipeline
from beit3.processing.image import load_image
from beit3.serve.app import ServeConfig, Server, create_app
from beit3.serve.batching import DynamicBatcher, QueueFull, RequestTimeout
from tests.serve.conftest import COLOURS, png_bytes, shape_picture


def gather(*coroutines):
    async def main():
        return await asyncio.gather(*coroutines, return_exceptions=True)
    return asyncio.run(main())


# ------------------------------------------------------------------------------------- the batcher
def test_concurrent_items_are_batched_and_answered_in_order():
    sizes = []

    def double(items):
        sizes.append(len(items))
        return [2 * item for item in items]

    batcher = DynamicBatcher(double, max_batch=8, max_wait_ms=100, queue_size=64)
    try:
        results = gather(*(batcher.run(k) for k in range(20)))
    finally:
        batcher.close()
    assert results == [2 * k for k in range(20)]
    assert len(sizes) < 20 and max(sizes) == 8 and sum(sizes) == 20
    assert batcher.calls == len(sizes) and sum(n * c for n, c in batcher.batch_sizes.items()) == 20


def test_max_batch_one_runs_every_item_alone():
    batcher = DynamicBatcher(lambda items: [len(items)] * len(items), max_batch=1, max_wait_ms=50)
    try:
        assert gather(*(batcher.run(k) for k in range(5))) == [1] * 5
    finally:
        batcher.close()
    assert batcher.calls == 5


def test_a_bad_item_fails_only_its_own_request():
    def inverse(items):
        return [1 / item for item in items]

    batcher = DynamicBatcher(inverse, max_batch=4, max_wait_ms=100)
    try:
        results = gather(*(batcher.run(k) for k in (1, 2, 0, 4)))
    finally:
        batcher.close()
    assert results[0] == 1 and results[1] == 0.5 and results[3] == 0.25
    assert isinstance(results[2], ZeroDivisionError)


def test_a_full_queue_refuses_at_once_with_a_retry_time():
    entered, release = threading.Event(), threading.Event()

    def blocked(items):
        entered.set()
        release.wait(5)
        return items

    batcher = DynamicBatcher(blocked, max_batch=1, max_wait_ms=0, queue_size=2, timeout_s=20)
    try:
        first = batcher.submit("a")
        assert entered.wait(5)  # the worker holds "a"; the queue is empty again
        waiting = [batcher.submit("b"), batcher.submit("c")]
        assert batcher.queue_length == 2
        with pytest.raises(QueueFull, match="queue is full") as refused:
            batcher.submit("d")
        assert refused.value.retry_after == 2
        release.set()
        assert [f.result(5) for f in [first, *waiting]] == ["a", "b", "c"]
    finally:
        release.set()
        batcher.close()


def test_a_request_unanswered_in_time_times_out_and_its_item_is_skipped():
    seen = []

    def slow(items):
        seen.extend(items)
        time.sleep(0.4)
        return items

    batcher = DynamicBatcher(slow, max_batch=1, max_wait_ms=0, timeout_s=0.15)
    try:
        results = gather(batcher.run("first"), batcher.run("second"))
        assert all(isinstance(r, RequestTimeout) for r in results)
        time.sleep(0.5)
        assert seen == ["first"]  # "second" timed out while queued: never run
    finally:
        batcher.close()


# ------------------------------------------------------------------------------------- through the app
@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    shapes = ("circle", "square", "triangle")
    return [png_bytes(shape_picture(colour, shapes[k % 3], 48 + 8 * k)) for k, colour in enumerate(COLOURS.values())]


def post_all(app, path: str, pictures: list[bytes], data: dict | None = None) -> list[httpx.Response]:
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(client.post(path, files={"image": ("p.png", picture, "image/png")},
                                                      data=data or {}) for picture in pictures))
    return asyncio.run(main())


def test_concurrent_requests_share_forward_calls_and_each_gets_its_own_answer(world, pictures):
    server = Server(ServeConfig(models=[world["models"]["classification"]], device="cpu", max_batch=8,
                                max_wait_ms=200))
    forwards = []
    handle = server.pipelines["classify"].model.register_forward_hook(
        lambda module, args, output: forwards.append(args[0].shape[0]))
    try:
        responses = post_all(create_app(server), "/classify", pictures, {"top_k": 4})
    finally:
        handle.remove()
        server.close()
    assert [r.status_code for r in responses] == [200] * len(pictures)
    assert len(forwards) < len(pictures) and sum(forwards) == len(pictures)
    alone = pipeline("classification", world["models"]["classification"], device="cpu")
    for response, picture in zip(responses, pictures):
        expected = alone(load_image(picture), top_k=4)
        got = response.json()["labels"]
        assert [row["label"] for row in got] == [row["label"] for row in expected]
        assert [row["score"] for row in got] == pytest.approx([row["score"] for row in expected], abs=1e-5)
    assert len({tuple(row["score"] for row in r.json()["labels"]) for r in responses}) == len(pictures)


def test_the_app_answers_503_with_retry_after_when_the_queue_is_full(world, pictures):
    server = Server(ServeConfig(models=[world["models"]["classification"]], device="cpu", max_batch=1,
                                max_wait_ms=0, queue_size=1, timeout_s=10))
    batcher = server.batchers["classify"]
    run = batcher.fn

    def slow(items):
        time.sleep(0.5)
        return run(items)

    batcher.fn = slow
    try:
        responses = post_all(create_app(server), "/classify", pictures[:4])
    finally:
        server.close()
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and 503 in codes, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]


def test_the_app_answers_504_when_the_model_is_too_slow(world, pictures):
    server = Server(ServeConfig(models=[world["models"]["classification"]], device="cpu", timeout_s=0.2))
    run = server.batchers["classify"].fn
    server.batchers["classify"].fn = lambda items: time.sleep(0.6) or run(items)
    try:
        (response,) = post_all(create_app(server), "/classify", pictures[:1])
    finally:
        server.close()
    assert response.status_code == 504 and "did not answer within 0.2 s" in response.json()["detail"]
