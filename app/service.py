"""What one app instance holds: settings, metrics, readiness, the engine and the batcher; and its lifespan."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
        self.model_name = settings.model_name

    async def start(self) -> None:
        """Load and warm up in a thread, so the event loop stays free (and /health answers 503) meanwhile."""
        try:
            self.engine = await asyncio.to_thread(Engine.load, self.settings)
        except Exception as exc:
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            raise
        s = self.settings
        self.batcher = Batcher(
            self.engine.score,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_queue_texts=s.max_queue_texts,
            merge_requests=s.batching,
        )
        self.batcher.start()
        self.model_name = s.model_name or model_name(self.engine.card["base_model"], self.engine.parameters)
        self.status, self.detail = "ok", None

    async def stop(self) -> None:
        self.status, self.detail = "draining", "shutting down"
        if self.batcher is not None:
            await self.batcher.stop()

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        with self.metrics.tokenize.time():
            return self.engine.tokenize(texts)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup raises when the checkpoint cannot be served: uvicorn then exits non-zero with the message."""
    service: Service = app.state.service
    await service.start()
    yield
    await service.stop()
