"""Several named models in one server, added, replaced and removed while it serves (docs/serving.md, "Several
classifiers on one base").

A ServedModel is one loaded version of a named checkpoint. A request resolves the names it asks for to versions in
one step (ModelRegistry.use) and holds them until it is answered; its texts carry those versions through the
micro-batcher to the model thread. A replacement loads and warms up the new version while the old one serves, then
points the name at it in one step on the event loop: requests that resolved the name before finish on the old
version, later ones get the new, and none waits or fails for the swap. Once the last request holding the old
version is answered, its memory is given back to the system (training.runtime.shared.give_back_freed_memory).
Changes of one name run one at a time, in the order they were asked (a lock per name); changes of different names
run side by side, but load one at a time, each on a thread of its own that ends with its load (loading_thread).

Every version is a member of one training.runtime.shared.SharedClassifiers under its own key ("name@revision"), so
versions whose checkpoints record the same prefix fingerprint hold one copy of the prefix (a replacement trained on
the same base costs only its tail), and texts asked of several of them run the prefix once (run_batch).
"""

import asyncio
import gc
import logging
import os
import re
from collections import defaultdict
from collections.abc import Hashable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.errors import CheckpointRefused, ModelConflict, UnknownModel
from app.metrics import Metrics
from app.settings import check_default_model, check_model_name, variable
from training.runtime.classifier import Classifier, Reading
from training.runtime.options import ClassifierOptions
from training.runtime.shared import SharedClassifiers, give_back_freed_memory, member

# uvicorn's own logger: startup refusals and model changes show among its lines, in its format (text or JSON)
LOG = logging.getLogger("uvicorn.error")


@dataclass(eq=False)
class ServedModel:
    """One loaded version of the model `name`. Compared by identity: a replacement under the same name is another
    ServedModel."""

    name: str
    classifier: Classifier
    path: Path  # the checkpoint directory it was loaded from, as given
    revision: int  # 1 for the name's first load since the server started, then one more per load under the name
    # Texts whose models have the same group may share a batch and one prefix pass: the prefix's sharing key
    # (training.runtime.shared.member), or the version's own key for a checkpoint that shares nothing
    group: Hashable = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    in_use: int = 0  # requests holding this version (ModelRegistry.use), from resolving its name to their answer
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        """This version's name among the SharedClassifiers' members: "name@revision"."""
        return f"{self.name}@{self.revision}"

    async def released(self) -> None:
        """Returns once no request holds this version."""
        while self.in_use:
            self._idle.clear()
            await self._idle.wait()

    def _hold(self, change: int) -> None:
        self.in_use += change
        if not self.in_use:
            self._idle.set()


class ModelRegistry:
    """The served models by name, the default one, the checkpoints refused at startup, and the changes made while
    serving. Lives on the event loop: every method is called from it. Checkpoints load (Classifier.load) on the
    executor a method is given, so the event loop (and the model thread, for a change while serving) stays free."""

    def __init__(self, options: ClassifierOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.refused: dict[str, str] = {}  # name -> why its checkpoint was not served, from startup
        self.shared = SharedClassifiers()  # every version a request may still hold, by ServedModel.key
        self._revisions: dict[str, int] = defaultdict(int)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loading = asyncio.Lock()  # loads while serving, one at a time: one model's memory in flight
        # what reads the default model's labels as they were at startup (the spamd listener, the feedback store):
        # while anything does, a replacement of the default model must keep them
        self.label_readers: list[str] = []

    async def start(
        self, sources: list[tuple[str | None, Path]], default: str | None, loader: Executor
    ) -> list[ServedModel]:
        """Load every source in turn on `loader`: (name, checkpoint directory), name None for the one checkpoint
        of the single-model setup (named then from its card, app.service.model_name). A checkpoint that cannot be
        loaded is refused, its name and reason logged and kept in `refused`, and the others serve. Returns the
        loaded models.

        Raises what loading the default model raised (CheckpointError, ValueError, RuntimeError), or ValueError for
        no sources, or a default that is not among the sources or unset with several (check_default_model): without
        its default model the server cannot answer the requests that name none.
        """
        if not sources:
            raise ValueError(f"no models to serve: set {variable('models_dir')} or {variable('models')}")
        check_default_model([name for name, _ in sources], default)
        loop = asyncio.get_running_loop()
        for name, path in sources:
            try:
                if name is not None:
                    check_model_name(name)
                classifier = await loop.run_in_executor(loader, Classifier.load, path, self.options)
            except Exception as exc:
                if name is None or name == default or len(sources) == 1:
                    raise
                self.refused[name] = reason = f"{type(exc).__name__}: {exc}"
                LOG.error("model %r (%s) refused: %s", name, path, reason)
                continue
            model = self._version(name or self._derived_name(classifier), classifier, path)
            self.shared.add(model.key, classifier)  # drops its copy of a prefix another member holds
            self._install(model)
        self.default = default or next(iter(self.models))
        return list(self.models.values())

    def _version(self, name: str, classifier: Classifier, path: Path) -> ServedModel:
        """The next version of `name`, not yet a member of `shared` nor served."""
        revision = self._revisions[name] + 1
        return ServedModel(name, classifier, path, revision, member(f"{name}@{revision}", classifier).key)

    def _install(self, model: ServedModel) -> None:
        """Serve `model`, already a member of `shared`: one step on the event loop."""
        self._revisions[model.name] = model.revision
        model.group = model.group or model.key
        self.models[model.name] = model
        self.refused.pop(model.name, None)

    def sharing(self, model: ServedModel) -> list[str]:
        """The other models served now that hold `model`'s prefix and compute it once with it."""
        served = {m.key: m.name for m in self.models.values()}
        return [served[key] for key in self.shared.sharing(model.key) if key in served and key != model.key]

    def run_batch(self, rows: list[list[int]], needs: list[tuple[ServedModel, ...]]) -> list[list[Reading]]:
        """One batch the micro-batcher formed (app.batcher.Batcher), its rows of one group -> for each row, its
        Reading from each model it needs, in the order of its `needs`. Rows that need the same models run as one
        forward pass: one model's through its Classifier.predict_logits, as a server of one model runs it; several's
        through SharedClassifiers.predict_logits, the shared prefix once, then each model's tail. Each model's
        logits are read out here, once for the batch (Classifier.read_rows). Runs on the model thread."""
        rows_of: dict[tuple[ServedModel, ...], list[int]] = defaultdict(list)
        for i, models in enumerate(needs):
            rows_of[models].append(i)
        results: list[list[Reading]] = [[] for _ in rows]
        for models, indices in rows_of.items():
            asked = [rows[i] for i in indices]  # one list for all: SharedClassifiers runs their prefix once
            if len(models) == 1:
                logits = {models[0].key: models[0].classifier.predict_logits(asked)}
            else:
                logits = self.shared.predict_logits({m.key: asked for m in models})
            readings = [m.classifier.read_rows(logits[m.key]) for m in models]
            for j, i in enumerate(indices):
                results[i] = [model_readings[j] for model_readings in readings]
        return results

    @staticmethod
    def _derived_name(classifier: Classifier) -> str:
        return model_name(classifier.card.base_model, classifier.parameter_count)

    def get(self, name: str | None) -> ServedModel:
        """The model `name` serves now (None: the default). Raises UnknownModel listing the names served, and
        the reason for a name refused at startup."""
        model = self.models.get(self.default if name is None else name)
        if model is None:
            raise self._unknown([name])
        return model

    def _unknown(self, names: list[str]) -> UnknownModel:
        """The 404 for `names`, none of them served: each, with why for one refused at startup, and those served."""
        shown = [
            f"{name!r} (its checkpoint was refused at startup: {self.refused[name]})"
            if name in self.refused
            else repr(name)
            for name in names
        ]
        return UnknownModel(f"no model named {', '.join(shown)}; the models are {sorted(self.models)}")

    @contextmanager
    def use(self, names: list[str | None]) -> Iterator[list[ServedModel]]:
        """The models the names serve now, held until the block ends: a replacement or removal meanwhile lets the
        block finish on these versions and gives back their memory after. Raises UnknownModel naming every name not
        served."""
        unknown = [name for name in names if name is not None and name not in self.models]
        if unknown:
            raise self._unknown(unknown)
        models = [self.get(name) for name in names]  # all resolved before any is held: no await in between
        for model in models:
            model._hold(1)
        try:
            yield models
        finally:
            for model in models:
                model._hold(-1)

    async def put(self, name: str, path: Path) -> tuple[ServedModel, ServedModel | None]:
        """Serve the checkpoint at `path` as `name`: added, or replacing the version serving now. Loads and warms up
        on a loading_thread while the current version keeps serving, swaps in one step, and returns once the old
        version's last request is answered and its memory given back. Returns the new version and the one it
        replaced.

        Raises CheckpointRefused with the loader's reason (CheckpointError, ValueError, RuntimeError of a failed
        warm-up), or for a replacement of the default model with other labels while label_readers read them: nothing
        changes then.
        """
        loop = asyncio.get_running_loop()
        async with self._locks[name]:
            async with self._loading:
                with loading_thread() as loader:
                    try:
                        classifier = await loop.run_in_executor(loader, Classifier.load, path, self.options)
                        self._check_labels(name, classifier.card.labels)
                    except Exception as exc:
                        self.metrics.model_changes.labels(model=name, change="refused").inc()
                        raise CheckpointRefused(f"{path}: {type(exc).__name__}: {exc}") from None
                    previous = self.models.get(name)
                    model = self._version(name, classifier, path)
                    # joining drops its copy of a shared prefix and trims the heap: off the event loop, which serves
                    await loop.run_in_executor(loader, self.shared.add, model.key, classifier)
            self._install(model)
            self.metrics.model_changes.labels(model=name, change="replaced" if previous else "added").inc()
            LOG.info("model %r revision %d serving from %s", name, model.revision, path)
            if previous is not None:
                await self._give_back(previous)
            return model, previous

    def _check_labels(self, name: str, labels: tuple[str, ...]) -> None:
        """Raises ValueError for a replacement of the default model with other labels while label_readers read
        them."""
        if name != self.default or not self.label_readers:
            return
        served = self.models[name].classifier.card.labels
        if labels != served:
            raise ValueError(
                f"the labels of {name!r}, the default model, are {list(served)} and are used by "
                f"{' and '.join(self.label_readers)}: a replacement keeps them (restart the server to change them); "
                f"this checkpoint's are {list(labels)}"
            )

    async def remove(self, name: str) -> ServedModel:
        """Stop serving `name`: requests that already hold it finish on it, later ones get UnknownModel. Returns
        once its last request is answered and its memory given back.

        Raises UnknownModel for a name not served, ModelConflict for the default model.
        """
        async with self._locks[name]:
            model = self.get(name)
            if name == self.default:
                raise ModelConflict(
                    f"{name!r} is the default model ({variable('default_model')}) and cannot be removed"
                )
            del self.models[name]
            self.metrics.model_changes.labels(model=name, change="removed").inc()
            LOG.info("model %r removed", name)
            await self._give_back(model)
            return model

    async def _give_back(self, model: ServedModel) -> None:
        await model.released()
        self.shared.remove(model.key)  # a prefix another member holds stays; its own modules go
        model.classifier = None  # the last reference outside the requests that held it, now answered
        # Here, on the event loop: run from another thread, the collection and trim left a removed GPT-2 124M's
        # 470 MiB resident (measured with benchmarks.model_swap); a pause of the loop once per change
        gc.collect()
        give_back_freed_memory()


# Nice value of the thread that loads models while serving: 10 of 19, so a load takes the cores the batches leave
LOADING_NICENESS = 10


@contextmanager
def loading_thread() -> Iterator[Executor]:
    """A thread for one change's loading and warm-up, at a lower priority (yield_to_serving), that ends when the
    block does.

    Why it ends: torch's intra-op thread pool (OpenMP) belongs to the thread that calls it, and while a second
    thread's pool lives beside the model thread's, libgomp counts more threads than cores and stops every pool's
    idle threads from spinning between parallel regions, so that each of the model's operations waits for its
    threads to wake. Measured with benchmarks.change_speed on 2 cores: with a loading thread that lived on after a
    change, the model's batches of 32 ran from then on at 0.79 of an unchanged server's speed in int8, 0.88 in
    bfloat16 and 0.93 in float32; with this one, at 0.98 to 1.01.
    """
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-load", initializer=yield_to_serving)
    try:
        yield loader
    finally:
        loader.shutdown(wait=False)  # its thread ends once its call is done (at once: the block awaited it)


def yield_to_serving() -> None:
    """Lower the calling thread's scheduling priority by LOADING_NICENESS (Linux: nice is per thread, and the
    threads it starts, torch's intra-op pool among them, inherit it), so that loading and warming up a model while
    serving takes the CPU time the serving batches leave. Elsewhere, or where refused, nothing changes."""
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + LOADING_NICENESS)


def model_name(base_model: str, parameter_count: int) -> str:
    """ "spamgpt-gpt2-124m" from the card's base model ("gpt2" or "openai-community/gpt2") and the parameter count:
    the name of the one model of a server given only a checkpoint_dir and no model_name."""
    base = re.sub(r"[^a-z0-9.]+", "-", base_model.rsplit("/", 1)[-1].lower()).strip("-")
    for scale, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k")):
        if parameter_count >= scale:
            return f"spamgpt-{base}-{parameter_count / scale:.3g}{suffix}"
    return f"spamgpt-{base}-{parameter_count}"
