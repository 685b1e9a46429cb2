"""The service the routes call: one app instance's settings, metrics and readiness, its models (app.models
.ModelRegistry: one or several named classifiers, training.runtime.classifier.Classifier) and micro-batcher; and its
lifespan. Routes make one call into it (classify, label_logits, info, health, or the registry's put and remove) and
never reach a classifier or the batcher themselves."""

import asyncio
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
from app.feedback import Feedback
from app.metrics import Metrics
from app.models import ModelRegistry, ServedModel
from app.schemas import Health, Info, ModelInfo
from app.settings import Settings
from app.spamd import SpamdServer
from training.runtime.classifier import Classifier, MessageRows, Prediction, Reading
from training.runtime.mail import NOT_A_MESSAGE, is_message

# /info's limits beside the batcher's (app.batcher.BatchLimits): what one request and one connection may hold
REQUEST_LIMITS = (
    "max_texts_per_request",
    "max_text_chars",
    "max_message_bytes",
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
class Scored:
    """One model's answer to a request's texts: each text's token ids for that model, whether it was truncated,
    and its Reading (read out with its batch on the model thread)."""

    rows: list[list[int]]
    truncated: list[bool]
    readings: list[Reading]

    @property
    def logits(self) -> torch.Tensor:
        """(N, n_labels) float32 logits, the readings' rows stacked."""
        return torch.stack([r.logits for r in self.readings])


@dataclass(frozen=True)
class LabelLogits:
    """Texts' logits with the labels they are for: (N, n_labels) float32, every row finite, columns in `labels`'
    order."""

    labels: tuple[str, ...]
    logits: torch.Tensor


class Service:
    """One app instance's models and its state: "loading" until start() has loaded and warmed up the classifiers,
    then "ok"; "failed" when loading raised, or should the batcher stop on an internal error; "draining" once
    shutdown began. Models added, replaced or removed while serving (app.models.ModelRegistry) leave the state
    "ok"."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.status: Literal["loading", "ok", "failed", "draining"] = "loading"
        self.detail = f"loading {settings.models_dir or settings.models or settings.checkpoint_dir}"
        self.models = ModelRegistry(settings.classifier_options(), self.metrics)
        self.batch_limits = settings.batch_limits()
        self._batcher: Batcher | None = None
        # Every model call at startup (load, warm-up) and every batch on this one thread: torch's intra-op thread
        # pool belongs to the thread that calls it, and a second live pool slows every batch (app.models.
        # loading_thread, which loads the models changed while serving on threads that end)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-model")
        self.feedback: Feedback | None = None  # the corrections store, when settings.feedback_enabled

    @property
    def model_name(self) -> str | None:
        """The default model's name, once loaded."""
        return self.models.default

    @property
    def classifier(self) -> Classifier:
        """The default model's classifier, once loaded."""
        return self.models.get(None).classifier

    async def start(self) -> None:
        """Load and warm up every model in a thread, so the event loop stays free (and /health answers 503)
        meanwhile; a checkpoint other than the default's that cannot be loaded is refused, named in the log and in
        /info, and the others serve (ModelRegistry.start).

        Raises what loading the default model raises (CheckpointError, ValueError, RuntimeError), and ValueError
        for models that cannot be told apart (two of one name) or a default model that is not among them; the
        status is then "failed".
        """
        s = self.settings
        try:
            await self.models.start(s.model_sources(), s.default_model, self.model_thread)
            if s.feedback_enabled:  # a damaged database stops the start, naming its file
                self.feedback = await Feedback.open(s.feedback_path, self.classifier.card.labels)
                self.models.label_readers.append("the feedback store")
        except Exception as exc:
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            raise
        # one batch the batcher formed, each row with the models it asks -> per row, each model's (n_labels,) logits
        self._batcher = Batcher(
            self.models.run_batch,
            self.metrics,
            self.batch_limits,
            self.model_thread,
            group=lambda models: models[0].group,
            on_failure=self._batcher_failed,
        )
        self._batcher.start()
        self.status, self.detail = "ok", None

    def _batcher_failed(self, exc: BaseException) -> None:
        """Readiness goes 503 ("failed") for good: no request can be served any more."""
        self.status, self.detail = "failed", f"the batcher stopped: {type(exc).__name__}: {exc}"

    def drain(self) -> None:
        """Readiness goes 503 ("draining"); requests are still served until the batcher stops (Service.stop)."""
        self.status, self.detail = "draining", "shutting down"

    async def stop(self) -> None:
        """Drain, run the queued texts to the end, then release the model thread."""
        self.drain()
        if self._batcher is not None:
            await self._batcher.stop()
        self.model_thread.shutdown()
        if self.feedback is not None:
            self.feedback.close()

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
        """The default model's card at the top level, where and how it runs, and every limit in force; then every
        model's card (the default's too) and the checkpoints refused at startup. Call once ready."""
        models = [self.model_info(model) for model in self.models.models.values()]
        default = next(m for m in models if m.model == self.models.default)
        return Info(
            **default.model_dump(),
            limits={**asdict(self.batch_limits), **{name: getattr(self.settings, name) for name in REQUEST_LIMITS}},
            models=models,
            refused=self.models.refused,
        )

    def model_info(self, model: ServedModel) -> ModelInfo:
        """One model's card, where it was loaded from, what it shares, and where and how it runs."""
        classifier, card = model.classifier, model.classifier.card
        return ModelInfo(
            model=model.name,
            checkpoint=str(model.path),
            revision=model.revision,
            loaded_at=model.loaded_at,
            prefix=None if card.prefix is None else card.prefix.sha256,
            sharing=self.models.sharing(model),
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
            mail={
                "extraction": classifier.extraction.to_json(),
                "extraction_source": "checkpoint" if card.extraction else "default (checkpoint trained on texts)",
                "windows": classifier.options.mail_windows,
                "max_windows": classifier.options.mail_max_windows,
            },
        )

    async def classify(
        self, texts: list[str], receive: Receive, model: str | None = None, models: list[str] | None = None
    ) -> dict:
        """The /classify response for validated `texts` from the model `model` (None: the default):
        `{"model": name, "results": [...]}`, one result per text in input order, each a Prediction's fields
        (Classifier.predictions, from which file scoring builds its records). With `models` (several names, and
        `model` None): `{"models": names, "results": [{name: result, ...}, ...]}`, each text answered by each model,
        models on one base from one pass of their shared prefix.

        Raises UnknownModel (404) for a name not served, and what _score raises.
        """
        names = [model] if models is None else models
        with self.models.use(names) as served:
            scored = await self._score(texts, receive, served)
        answers = {m.name: m.classifier.predictions(s.rows, s.truncated, s.readings) for m, s in scored.items()}
        if models is None:
            return {"model": served[0].name, "results": [result(p) for p in answers[served[0].name]]}
        return {"models": models, "results": [{n: result(answers[n][i]) for n in models} for i in range(len(texts))]}

    async def classify_messages(
        self, raws: list[bytes], receive: Receive, field: str = "messages", model: str | None = None
    ) -> dict:
        """The /classify response for validated raw messages from the model `model` (None: the default), as
        classify's for texts, each result with what was read of its message (`mail`). `field`: where the messages
        sit in the request, for errors ("messages", or "body" for one message/rfc822 body).

        Each message is read (training.runtime.mail.read_message, by the checkpoint's extraction) and cut into
        windows in a thread; the windows go through the batcher as texts do; each message's windows are combined
        (Classifier.message_predictions). Raises UnknownModel (404) for a name not served; InvalidInput naming each
        message with nothing readable; ModelError naming each message whose windows gave non-finite logits; else
        what _score raises.
        """
        paths = text_paths(field, raws) if field != "body" else [field]
        with self.models.use([model]) as (served,):
            classifier = served.classifier
            messages = await asyncio.to_thread(self._read_messages, classifier, raws)
            unreadable = [(path, raw) for path, raw, m in zip(paths, raws, messages, strict=True) if not m.readable]
            if unreadable:
                cause = (
                    "nothing readable: no visible characters in its subject or any readable part "
                    "(attachments are not read)"
                )
                raise InvalidInput.of(
                    [
                        ErrorDetail(field=path, message=cause if is_message(raw) else NOT_A_MESSAGE)
                        for path, raw in unreadable
                    ]
                )
            rows = [row for m in messages for row in m.rows]
            answers = await unless_client_leaves(receive, self._batcher.submit(rows, [(served,)] * len(rows)))
        windows = Scored(rows, [], [answer[0] for answer in answers])
        window_paths = [path for path, m in zip(paths, messages, strict=True) for _ in m.rows]
        self._refuse_nonfinite({served: windows}, window_paths)
        self.metrics.model_texts.labels(model=served.name).inc(len(raws))
        results = [
            {
                **result(p),
                "mail": {
                    "windows": len(m.rows),
                    "defects": m.mail.defects,
                    "attachments": len(m.mail.attachments),
                    "message_id": m.mail.message_id,
                },
            }
            for m, p in zip(messages, classifier.message_predictions(messages, windows.logits), strict=True)
        ]
        return {"model": served.name, "results": results}

    def _read_messages(self, classifier: Classifier, raws: list[bytes]) -> list[MessageRows]:
        with self.metrics.tokenize.time():
            return classifier.read_messages(raws)

    async def label_logits(
        self,
        inputs: str | list[str],
        receive: Receive,
        field: str,
        refuse_truncation: bool = False,
        model: str | None = None,
    ) -> LabelLogits:
        """The logits of validated `inputs` (one text or a list) from the model `model` (None: the default) at the
        deployment prior (training.runtime.inference.Readout.scores), for the dialects that rank labels by scores.

        Raises UnknownModel (404) for a name not served, and what _score raises.
        """
        with self.models.use([model]) as (served,):
            scored = await self._score(inputs, receive, [served], field, refuse_truncation)
        classifier = served.classifier
        return LabelLogits(classifier.card.labels, classifier.checkpoint.readout.scores(scored[served].logits))

    async def _score(
        self,
        inputs: str | list[str],
        receive: Receive,
        models: list[ServedModel],
        field: str = "texts",
        refuse_truncation: bool = False,
    ) -> dict[ServedModel, Scored]:
        """Validated `inputs` (one text or a list) -> each model's Scored: the one path from a request's texts to
        the models. Texts are tokenized once per group of models and max_tokens, and each text goes to the batcher
        once per group, carrying the models of that group it asks: one prefix pass serves them all.

        `receive` is the request's ASGI channel, watched for the client leaving. Errors name texts by their place
        in the request's `field` (text_paths). Raises InvalidInput naming each text over max_tokens when
        refuse_truncation (TEI's `truncate: false`); ModelError naming each text the model gave non-finite logits
        for; the batcher's Overloaded, DeadlineExceeded and NotReady; ClientClosedRequest when the client leaves
        while waiting.
        """
        texts, paths = [inputs] if isinstance(inputs, str) else inputs, text_paths(field, inputs)
        asked: dict[tuple, tuple[ServedModel, ...]] = {}
        for m in models:
            key = (m.group, m.classifier.card.max_tokens)
            asked[key] = (*asked.get(key, ()), m)
        # Tokenized here, once per group (the batcher needs token counts to keep batches within max_batch_tokens):
        # a short request on the event loop, a longer one in a thread (tiktoken releases the GIL), so that requests
        # tokenize in parallel while the model runs (INLINE_TOKENIZE_CHARS).
        tokenizers = [ms[0] for ms in asked.values()]
        if sum(map(len, texts)) * len(tokenizers) <= INLINE_TOKENIZE_CHARS:
            tokenized = self._tokenize(texts, tokenizers)
        else:
            tokenized = await asyncio.to_thread(self._tokenize, texts, tokenizers)
        if refuse_truncation:
            self._refuse_truncated(models[0].classifier.card.max_tokens, tokenized[0][1], paths)
        rows = [row for ids, _ in tokenized for row in ids]
        needs = [ms for ms in asked.values() for _ in texts]
        answers = await unless_client_leaves(receive, self._batcher.submit(rows, needs))
        scored = {}
        for g, ((ids, truncated), ms) in enumerate(zip(tokenized, asked.values(), strict=True)):
            group_answers = answers[g * len(texts) : (g + 1) * len(texts)]
            for j, m in enumerate(ms):
                scored[m] = Scored(ids, truncated, [answer[j] for answer in group_answers])
        self._refuse_nonfinite(scored, paths)
        for m in models:
            self.metrics.model_texts.labels(model=m.name).inc(len(texts))
        return scored

    def _tokenize(self, texts: list[str], models: list[ServedModel]) -> list[tuple[list[list[int]], list[bool]]]:
        with self.metrics.tokenize.time():
            return [m.classifier.tokenize(texts) for m in models]

    @staticmethod
    def _refuse_truncated(limit: int, truncated: list[bool], paths: list[str]) -> None:
        """Raises InvalidInput naming each text over max_tokens `limit`, if any."""
        if any(truncated):
            raise InvalidInput.of(
                [
                    ErrorDetail(field=path, message=f"longer than max_tokens {limit}; send truncate: true")
                    for path, cut in zip(paths, truncated, strict=True)
                    if cut
                ]
            )

    def _refuse_nonfinite(self, scored: dict[ServedModel, Scored], paths: list[str]) -> None:
        """Raises ModelError naming each text (by its path in the request, one per row: a message's for each of its
        windows) whose row of a model's (N, n_labels) logits is not finite (and the model, when several answer),
        and counts those texts in spamgpt_model_errors_total; the request's other texts are not answered either."""
        cause = "the model gave non-finite logits (NaN or inf): a fault of the model, not of the text"
        # a message's windows are rows of one path: it is named once (per model)
        named = {
            (paths[i], None if len(scored) == 1 else m.name): None
            for m, s in scored.items()
            for i, reading in enumerate(s.readings)
            if not reading.finite
        }
        if not named:
            return
        details = [
            ErrorDetail(field=path, message=cause if name is None else f"model {name!r}: {cause}")
            for path, name in named
        ]
        where = ", ".join(path if name is None else f"{path} (model {name!r})" for path, name in named)
        self.metrics.model_errors.labels(cause="non_finite_logits").inc(len(details))
        raise ModelError(f"{where}: {cause}", details)


def result(p: Prediction) -> dict:
    """One text's /classify result from its Prediction."""
    return {"label": p.label, "probabilities": p.probabilities, "tokens": p.tokens, "truncated": p.truncated}


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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, float]]:
    """Startup raises when the checkpoint cannot be served: uvicorn then exits non-zero with the message.

    The lifespan state it yields reaches the server's connections: uvicorn hands it to each protocol it builds, so
    app.edge.protocol reads the arrival deadline of these settings there."""
    service: Service = app.state.service
    await service.start()
    spamd = SpamdServer(service) if service.settings.spamd_port is not None else None
    if spamd is not None:  # the spamd-protocol listener, on its own port: accepts until the server stops accepting
        await spamd.start()
    with draining_on_sigterm(service, service.settings.drain_delay_s):
        yield {ARRIVAL_TIMEOUT_STATE: service.settings.request_arrival_timeout_s}
    if spamd is not None:
        await spamd.stop()
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
