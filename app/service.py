"""The service the routes call: one app instance's settings, metrics and readiness, its classifier
(training.runtime.classifier.Classifier) and micro-batcher; and its lifespan. Routes make one call into it (classify,
label_logits, info, health) and never reach the classifier or the batcher themselves."""

import asyncio
import re
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from typing import Literal, TypeVar

import torch
from fastapi import FastAPI
from starlette.types import Receive

from app.batcher import Batcher
from app.edge.protocol import ARRIVAL_TIMEOUT_STATE
from app.errors import ClientClosedRequest, ErrorDetail, InvalidInput, ModelError, NotReady
from app.metrics import Metrics
from app.schemas import Health, Info
from app.settings import Settings
from training.runtime.classifier import Classifier
from training.runtime.inference import nonfinite_rows

# /info's limits beside the batcher's (app.batcher.BatchLimits): what one request and one connection may hold
REQUEST_LIMITS = (
    "max_texts_per_request",
    "max_text_chars",
    "max_body_bytes",
    "request_arrival_timeout_s",
    "max_body_bytes_in_flight",
    "max_connections",
)

# A request of at most this many characters is tokenized on the event loop: the hop to a thread and back costs the
# loop about 45 us of CPU, three times what tiktoken takes for an 80-character SMS (measured on a 2-core Xeon);
# 2,048 characters tokenize in about 0.3 ms, a pause of the loop no longer than a few hops'.
INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True)
class LabelLogits:
    """Texts' logits with the labels they are for: (N, n_labels) float32, every row finite, columns in `labels`'
    order."""

    labels: tuple[str, ...]
    logits: torch.Tensor


class Service:
    """One app instance's model and its state: "loading" until start() has loaded and warmed up the classifier,
    then "ok"; "failed" when loading raised; "draining" once shutdown began."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.status: Literal["loading", "ok", "failed", "draining"] = "loading"
        self.detail = f"loading {settings.checkpoint_dir}"
        self.classifier: Classifier | None = None
        self.batch_limits = settings.batch_limits()
        self._batcher: Batcher | None = None
        # Every model call (load, warm-up, batches) on this one thread: torch's intra-op thread pool belongs to
        # the thread that calls it, and one pool per calling thread would leave idle pools spinning on the cores
        # that the running one needs.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-model")
        self.model_name = settings.model_name

    async def start(self) -> None:
        """Load and warm up in a thread, so the event loop stays free (and /health answers 503) meanwhile.

        Raises what Classifier.load raises (CheckpointError, ValueError, RuntimeError), the status then "failed".
        """
        s = self.settings
        try:
            self.classifier = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, Classifier.load, s.checkpoint_dir, s.classifier_options()
            )
        except Exception as exc:
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            raise
        # one batch the batcher formed -> (B, n_labels) logits, one row per text
        self._batcher = Batcher(self.classifier.predict_logits, self.metrics, self.batch_limits, self.model_thread)
        self._batcher.start()
        self.model_name = s.model_name or model_name(self.classifier.card.base_model, self.classifier.parameter_count)
        self.status, self.detail = "ok", None

    def drain(self) -> None:
        """Readiness goes 503 ("draining"); requests are still served until the batcher stops (Service.stop)."""
        self.status, self.detail = "draining", "shutting down"

    async def stop(self) -> None:
        """Drain, run the queued texts to the end, then release the model thread."""
        self.drain()
        if self._batcher is not None:
            await self._batcher.stop()
        self.model_thread.shutdown()

    def require_ready(self) -> None:
        """Raises NotReady (503) unless the model is loaded: while loading, after a failed load. While draining,
        requests are still served (the drain delay after SIGTERM); the batcher refuses them once the lifespan
        shutdown stops it."""
        if self.status not in ("ok", "draining") or self._batcher is None:
            raise NotReady(f"model not ready ({self.status}): {self.detail}")

    def health(self) -> Health:
        """Status "ok" with the model's name once loaded and warmed up; else the status and why."""
        if self.status == "ok":
            return Health(status="ok", model=self.model_name)
        return Health(status=self.status, detail=self.detail)

    def info(self) -> Info:
        """The model card, where and how the model runs, and every limit in force. Call once ready."""
        classifier, card = self.classifier, self.classifier.card
        return Info(
            model=self.model_name,
            labels=list(card.labels),
            base_model=card.base_model,
            parameters=classifier.parameter_count,
            max_tokens=card.max_tokens,
            threshold=card.threshold,
            prior=None if card.calibration is None else card.calibration.prior,
            calibration=None if card.calibration is None else asdict(card.calibration),
            metrics=card.metrics,
            created=card.created,
            version=card.version,
            device=str(classifier.device),
            dtype=str(classifier.dtype).removeprefix("torch."),
            quantization=classifier.quantization,
            limits={**asdict(self.batch_limits), **{name: getattr(self.settings, name) for name in REQUEST_LIMITS}},
        )

    async def classify(self, texts: list[str], receive: Receive) -> dict:
        """The /classify response for validated `texts`: `{"model": name, "results": [...]}`, one result per text in
        input order, each a Prediction's fields (Classifier.predictions, from which file scoring builds its records).

        Raises what _score raises.
        """
        rows, truncated, logits = await self._score(texts, receive)
        results = [
            {"label": p.label, "probabilities": p.probabilities, "tokens": p.tokens, "truncated": p.truncated}
            for p in self.classifier.predictions(rows, truncated, logits)
        ]
        return {"model": self.model_name, "results": results}

    async def label_logits(
        self, inputs: str | list[str], receive: Receive, field: str, refuse_truncation: bool = False
    ) -> LabelLogits:
        """The logits of validated `inputs` (one text or a list) at the deployment prior
        (training.runtime.inference.Readout.scores), for the dialects that rank labels by scores.

        Raises what _score raises.
        """
        _, _, logits = await self._score(inputs, receive, field, refuse_truncation)
        return LabelLogits(self.classifier.card.labels, self.classifier.checkpoint.readout.scores(logits))

    async def _score(
        self, inputs: str | list[str], receive: Receive, field: str = "texts", refuse_truncation: bool = False
    ) -> tuple[list[list[int]], list[bool], torch.Tensor]:
        """Validated `inputs` (one text or a list) -> each text's token ids, whether it was truncated, and
        (N, n_labels) float32 logits, every row finite: the one path from a request's texts to the model.

        `receive` is the request's ASGI channel, watched for the client leaving. Errors name texts by their place
        in the request's `field` (text_paths). Raises InvalidInput naming each text over max_tokens when
        refuse_truncation (TEI's `truncate: false`); ModelError naming each text the model gave non-finite logits
        for; the batcher's Overloaded, DeadlineExceeded and NotReady; ClientClosedRequest when the client leaves
        while waiting.
        """
        texts, paths = [inputs] if isinstance(inputs, str) else inputs, text_paths(field, inputs)
        # Tokenized here, once (the batcher needs token counts to keep batches within max_batch_tokens): a short
        # request on the event loop, a longer one in a thread (tiktoken releases the GIL), so that requests
        # tokenize in parallel while the model runs (INLINE_TOKENIZE_CHARS).
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            rows, truncated = self._tokenize(texts)
        else:
            rows, truncated = await asyncio.to_thread(self._tokenize, texts)
        if refuse_truncation and any(truncated):
            limit = self.classifier.card.max_tokens
            raise InvalidInput.of(
                [
                    ErrorDetail(field=path, message=f"longer than max_tokens {limit}; send truncate: true")
                    for path, cut in zip(paths, truncated, strict=True)
                    if cut
                ]
            )
        logits = torch.stack(await unless_client_leaves(receive, self._batcher.submit(rows)))
        self._refuse_nonfinite(logits, paths)
        return rows, truncated, logits

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        with self.metrics.tokenize.time():
            return self.classifier.tokenize(texts)

    def _refuse_nonfinite(self, logits: torch.Tensor, paths: list[str]) -> None:
        """Raises ModelError naming each text (by its path in the request, one per row) whose row of (N, n_labels)
        logits is not finite, and counts those texts in spamgpt_model_errors_total; the request's other texts are
        not answered either."""
        bad = nonfinite_rows(logits)
        if not bad:
            return
        self.metrics.model_errors.labels(cause="non_finite_logits").inc(len(bad))
        cause = "the model gave non-finite logits (NaN or inf): a fault of the model, not of the text"
        details = [ErrorDetail(field=paths[i], message=cause) for i in bad]
        raise ModelError(f"{', '.join(paths[i] for i in bad)}: {cause}", details)


def text_paths(field: str, inputs: str | list[str]) -> list[str]:
    """Where each text sits in the request, as errors name it: `field` for one string, `field`.index in a list."""
    return [field] if isinstance(inputs, str) else [f"{field}.{i}" for i in range(len(inputs))]


T = TypeVar("T")


async def unless_client_leaves(receive: Receive, waiting: Awaitable[T]) -> T:
    """What `waiting` gives, unless the client disconnects first: then `waiting` is cancelled, which takes the
    request's texts off the queue, and ClientClosedRequest is raised."""
    work, left = asyncio.ensure_future(waiting), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.wait((work,))  # let its cancellation take the texts off the queue before answering
        raise ClientClosedRequest("the client disconnected while its texts waited")
    finally:  # also when this handler is cancelled itself (uvicorn's graceful-shutdown timeout)
        left.cancel()
        work.cancel()  # does nothing once it is done


async def _disconnected(receive: Receive) -> None:
    # The body has been read: the server's next message is http.disconnect, when the client goes away
    while (await receive())["type"] != "http.disconnect":
        pass


def model_name(base_model: str, parameter_count: int) -> str:
    """ "spamgpt-gpt2-124m" from the card's base model ("gpt2" or "openai-community/gpt2") and the parameter count."""
    base = re.sub(r"[^a-z0-9.]+", "-", base_model.rsplit("/", 1)[-1].lower()).strip("-")
    for scale, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k")):
        if parameter_count >= scale:
            return f"spamgpt-{base}-{parameter_count / scale:.3g}{suffix}"
    return f"spamgpt-{base}-{parameter_count}"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, float]]:
    """Startup raises when the checkpoint cannot be served: uvicorn then exits non-zero with the message.

    The lifespan state it yields reaches the server's connections: uvicorn hands it to each protocol it builds, so
    app.edge.protocol reads the arrival deadline of these settings there."""
    service: Service = app.state.service
    await service.start()
    with draining_on_sigterm(service, service.settings.drain_delay_s):
        yield {ARRIVAL_TIMEOUT_STATE: service.settings.request_arrival_timeout_s}
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
