"""Score files on many machines with Ray Data: the scoring of `python -m training predict`
(training.runtime.classifier.Classifier, its predictions as training.scoring.records), loaded once per worker, over
a Ray dataset. Needs the `ray` extra: pip install 'spamgpt[ray]'.

    import ray
    from training.runtime.options import ClassifierOptions
    from training.scoring.ray_data import score_dataset

    ray.init()  # or ray.init(address="auto") on a cluster; workers need spamgpt installed and the checkpoint's path
    ds = ray.data.read_csv("/data/messages/")  # read_json(..., lines=True) for JSONL; read_text for lines
    score_dataset(ds, "/models/spamgpt", ClassifierOptions(device="cpu")).write_csv("/data/scores/")

Each row gains the columns `predict` adds (label, probability_<label> for each label, tokens, truncated), with the
same values: the same functions, in the same length-sorted batches within the options' limits. Rows whose text is
not a non-blank string are dropped (`predict` reports them by line; a distributed read has no line numbers).
Ray is imported only by score_dataset, so this module loads without it.

Workers: by default as many as the cluster's free resources hold beside the reads and writes (worker_count): on two
CPUs, one. A fixed pool larger than what fits would leave its pending actors waiting for CPUs that the running ones
hold and the reads starved of one, so nothing would finish.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.scoring.records import result_columns, result_record, usable_text

ROWS_PER_CALL = 1024  # rows a worker scores per call: length-sorting within it is what keeps padding low
READ_CPUS = 1  # CPUs worker_count leaves free, so that reads can feed the workers and writes drain them


class RayScorer:
    """The callable class for `Dataset.map_batches`: each Ray worker (actor) builds one, which loads and checks the
    checkpoint once; each call scores a batch of rows in NumPy format (column name -> array).

    The load and every batch run on one thread of the scorer's own: Ray Data builds the scorer and calls it on
    different threads, and torch's intra-op thread pool belongs to the thread that calls it; two live pools in one
    process slow every batch (app.models.loading_thread says how). Measured with one worker of 2 CPUs on 2 cores,
    2,048 texts, worker start and load included: int8 13.3-13.5 s against 15.8-16.3 s with the model called on Ray's
    threads, float32 36.5-36.7 s against 37.6-37.7 s.

    Raises CheckpointError (in the worker) for a checkpoint that cannot be loaded.
    """

    def __init__(self, checkpoint: str, options: ClassifierOptions, text_column: str = "text", prefix: str = ""):
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamgpt-model")
        self.classifier = self.model_thread.submit(Classifier.load, checkpoint, options).result()
        self.text_column, self.prefix = text_column, prefix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's rows with a usable text (training.scoring.records.usable_text), with the result columns
        added."""
        usable = np.array([usable_text(text) for text in batch[self.text_column]], dtype=bool)
        batch = {name: column[usable] for name, column in batch.items()}
        texts = [str(text) for text in batch[self.text_column]]
        predictions = self.model_thread.submit(self.classifier.classify, texts).result()
        records = [result_record(p) for p in predictions]
        columns = result_columns(self.classifier.card.labels)
        added = {self.prefix + name: np.array([r[name] for r in records]) for name in columns}
        return {**batch, **added}


def worker_count(cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many scoring workers the Ray cluster's free resources (ray.available_resources) hold at once, with
    READ_CPUS left for the read and write tasks that feed and drain them; at least 1."""
    import ray

    free = ray.available_resources()
    fits = [(free.get("CPU", 0) - READ_CPUS) // cpus_per_worker] if cpus_per_worker else []
    fits += [free.get("GPU", 0) // gpus_per_worker] if gpus_per_worker else []
    return max(1, int(min(fits, default=1)))


def score_dataset(
    ds,
    checkpoint: str,
    options: ClassifierOptions,
    text_column: str = "text",
    prefix: str = "",
    concurrency: int | None = None,
    rows_per_call: int = ROWS_PER_CALL,
    cpus_per_worker: float = 1,
):
    """`ds` (a ray.data.Dataset) with the result columns added to every row whose text is usable: a lazy
    dataset, computed when written or consumed. Each worker (a Ray actor holding the model) reserves
    `cpus_per_worker` CPUs, and 1 GPU when the options' device is CUDA; `concurrency` of them, or by default a pool
    that grows from 1 to what the free resources hold (worker_count). The checkpoint path must be readable by every
    worker.

    Raises ValueError for result columns that clash with the dataset's (pass `prefix`), or `concurrency` below 1.
    """
    import ray

    names = ds.schema().names if ds.schema() is not None else []
    results = {prefix + name for name in ("label", "tokens", "truncated")}
    clash = sorted(name for name in names if name in results or name.startswith(prefix + "probability_"))
    if clash:
        raise ValueError(f"the dataset has columns named like the results {clash}; pass a prefix")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1 (or None: from the free resources), got {concurrency!r}")
    gpus = 1 if options.device.startswith("cuda") else 0
    if concurrency is None:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=worker_count(cpus_per_worker, gpus))
    else:
        pool = ray.data.ActorPoolStrategy(size=concurrency)
    kwargs = {"checkpoint": checkpoint, "options": options, "text_column": text_column, "prefix": prefix}
    return ds.map_batches(
        RayScorer,
        fn_constructor_kwargs=kwargs,
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=pool,
        num_cpus=cpus_per_worker,
        num_gpus=gpus,
    )
