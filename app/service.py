"""What one app instance holds: settings, metrics, readiness, the engine and the batcher; and its lifespan."""

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Literal

from fastapi import FastAPI

from app.batcher import Batcher
from app.engine import Engine, model_name
from app.metrics import Metrics
from app.settings import Settings


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.status: Literal["loading", "ok", "failed", "draining"] = "loading"
        self.detail = f"loading {settings.checkpoint_dir}"
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        # Every model call (load, warm-up, batches) on this one thread: torch's intra-op thread pool belongs to
        # the thread that calls it, and one pool per calling thread would leave idle pools spinning on the cores
        # that the running one needs.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-model")
        self.model_name = settings.model_name

    async def start(self) -> None:
        """Load and warm up in a thread, so the event loop stays free (and /health answers 503) meanwhile."""
        try:
            self.engine = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, Engine.load, self.settings
            )
        except Exception as exc:
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            raise
        s = self.settings
        self.batcher = Batcher(
            self.engine.predict_logits,  # one batch the batcher formed -> (B, n_labels) logits, one row per text
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_queue_texts=s.max_queue_texts,
            timeout_s=s.request_timeout_s,
            merge_requests=s.batching,
            executor=self.model_thread,
        )
        self.batcher.start()
        self.model_name = s.model_name or model_name(self.engine.card.base_model, self.engine.parameter_count)
        self.status, self.detail = "ok", None

    def drain(self) -> None:
        """Readiness goes 503 ("draining"); requests are still served until the batcher stops (Service.stop)."""
        self.status, self.detail = "draining", "shutting down"

    async def stop(self) -> None:
        self.drain()
        if self.batcher is not None:
            await self.batcher.stop()
        self.model_thread.shutdown()

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        with self.metrics.tokenize.time():
            return self.engine.tokenize(texts)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup raises when the checkpoint cannot be served: uvicorn then exits non-zero with the message."""
    service: Service = app.state.service
    await service.start()
    with draining_on_sigterm(service, service.settings.drain_delay_s):
        yield
    await service.stop()


@contextmanager
def draining_on_sigterm(service: Service, delay_s: float) -> Iterator[None]:
    """A drain that clients can see. When SIGTERM arrives, readiness goes 503 (/health "draining") at once, while
    for `delay_s` seconds the server still accepts connections and serves /classify: load balancers that poll
    readiness, and a Kubernetes Service whose endpoint removal takes a moment to reach every node, stop sending
    requests here before the port closes, so none meets a refused connection. Then the server's own handler runs:
    uvicorn stops accepting, finishes in-flight requests (within its --timeout-graceful-shutdown), and the
    lifespan shutdown drains the queue. A second SIGTERM during the delay ends it at once; delay_s 0 stops at
    once. SIGINT (Ctrl+C) is left to the server: no delay.

    Our handler goes in front of the server's own. Where only the default handles SIGTERM (no server that drains),
    or off the main thread (signal handlers are set there only), signals are left alone."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    loop = asyncio.get_running_loop()
    delay: asyncio.TimerHandle | None = None

    def stop_accepting(signum, frame) -> None:
        if delay is not None:
            delay.cancel()
        previous(signum, frame)

    def start_delay(signum, frame) -> None:  # on the event loop
        nonlocal delay
        if delay is None:
            delay = loop.call_later(delay_s, stop_accepting, signum, frame)

    def on_sigterm(signum, frame) -> None:
        if delay_s == 0 or service.status == "draining":  # no delay asked, or a second SIGTERM: stop now
            service.drain()
            loop.call_soon_threadsafe(stop_accepting, signum, frame)
            return
        service.drain()
        # a signal handler may interrupt the event loop anywhere: only call_soon_threadsafe is safe to call here
        loop.call_soon_threadsafe(start_delay, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if delay is not None:  # the server stopped first (SIGINT during the delay): nothing left to start
            delay.cancel()
