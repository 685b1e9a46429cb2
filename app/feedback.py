"""The server's side of the feedback store (training.runtime.feedback.FeedbackStore): its writes and reads run on one
thread of their own, so a disk's fsync never blocks the event loop, and the routes (POST /feedback) and the spamd
listener (TELL) await them."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

from training.runtime.feedback import Correction, FeedbackStats, FeedbackStore, Recorded


class Feedback:
    """An open FeedbackStore and the thread its calls run on. The store's own errors reach the caller as they are:
    UnknownLabel and ValueError (the report's fault), FeedbackStoreError (the disk's)."""

    def __init__(self, store: FeedbackStore):
        self.store = store
        # One thread: writes queue here in arrival order rather than holding the default pool's threads (which
        # tokenizing uses) while they wait for the store's lock and the disk
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-feedback")

    @classmethod
    async def open(cls, path: Path, labels: tuple[str, ...]) -> Self:
        """The store at `path` for a model with `labels`, opened (and checked) in a thread. Raises
        FeedbackStoreError naming the file when it is not a usable feedback database."""
        return cls(await asyncio.to_thread(FeedbackStore, path, labels))

    async def _run(self, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def record(
        self, content: str | bytes, label: str, reason: str | None = None, source: str = "http"
    ) -> Recorded:
        """FeedbackStore.record: returns once the report is durable on disk (a text as str, a raw message as
        bytes). A caller cancelled meanwhile does not cancel the write."""
        return await self._run(self.store.record, content, label, reason, source)

    async def stats(self) -> FeedbackStats:
        return await self._run(self.store.stats)

    async def corrections(self) -> list[Correction]:
        """Every correction with its current label (FeedbackStore.corrections)."""
        return await self._run(lambda: list(self.store.corrections()))

    def close(self) -> None:
        """Waits for the writes already queued, then closes the database."""
        self._thread.shutdown()
        self.store.close()
