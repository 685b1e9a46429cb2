"""Ray Data scoring on a local Ray cluster (this machine only) gives the single-process results. Skips without the
`ray` extra; CI installs it for this test."""

import csv
import random
import textwrap
import time
from pathlib import Path

import pytest

from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.scoring.records import result_record

ray = pytest.importorskip("ray")
ray_data = pytest.importorskip("ray.data")
ROOT = Path(__file__).resolve().parents[3]
WORDS = ["win", "prize", "cash", "see", "you", "at", "lunch", "free", "call", "now", "mum", "thanks", "ok", "£1000"]


def docstring_example() -> str:
    """The example in training.scoring.ray_data's docstring (the README's), dedented."""
    import training.scoring.ray_data

    lines = training.scoring.ray_data.__doc__.splitlines()
    start = lines.index("    import ray")
    end = next(i for i, line in enumerate(lines) if ".write_csv(" in line)
    return textwrap.dedent("\n".join(lines[start : end + 1]))


def write_texts(path: Path, texts: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, text] for i, text in enumerate(texts))


def read_scores(folder: Path) -> list[dict]:
    rows = []
    for part in sorted(folder.glob("*.csv")):
        with open(part, newline="") as f:
            rows += list(csv.DictReader(f))
    return sorted(rows, key=lambda row: int(row["id"]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::ResourceWarning")
def test_the_example_runs_as_written_on_two_cpus(tiny_checkpoint, tmp_path):
    # Before the module's 4-CPU cluster starts: a fixed pool of more workers than fit (concurrency=8 here) never
    # finished; the default pool fits the free CPUs beside the reads
    assert not ray.is_initialized()
    texts = [f"free prize number {i}" if i % 2 else f"see you at {i}" for i in range(100)]
    (tmp_path / "messages").mkdir()
    write_texts(tmp_path / "messages" / "part-0.csv", texts)
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    example = (
        docstring_example()
        .replace("ray.init()", f"ray.init(num_cpus=2, include_dashboard=False, runtime_env={runtime_env!r})")
        .replace("/data/messages/", str(tmp_path / "messages"))
        .replace("/models/spamgpt", str(tiny_checkpoint))
        .replace("/data/scores/", str(tmp_path / "scores"))
    )
    assert "concurrency" not in example
    try:
        exec(example, {})
    finally:
        ray.shutdown()
    rows = read_scores(tmp_path / "scores")
    assert [row["text"] for row in rows] == texts
    expected = Classifier.load(str(tiny_checkpoint), ClassifierOptions(device="cpu")).classify(texts)
    assert [row["label"] for row in rows] == [p.label for p in expected]


@pytest.fixture(scope="module")
def local_ray():
    # The workers import this checkout's `training`, whatever the environment has installed.
    # 4 logical CPUs: the 2 scoring actors hold one each, and the read tasks need one to run beside them
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::ResourceWarning")
def test_ray_data_gives_the_single_process_results(local_ray, tiny_checkpoint, tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for _ in range(300)]  # some past max_tokens (48)
    data = tmp_path / "in.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, text] for i, text in enumerate(texts))
        writer.writerow([300, "   "])  # not a usable text: dropped, as predict skips it
    options = ClassifierOptions(device="cpu")

    from training.scoring.ray_data import score_dataset

    ds = ray_data.read_csv(str(data))
    score_dataset(ds, str(tiny_checkpoint), options, concurrency=2, rows_per_call=64).write_csv(str(tmp_path / "out"))
    rows = []
    for part in sorted((tmp_path / "out").glob("*.csv")):
        with open(part, newline="") as f:
            rows += list(csv.DictReader(f))
    rows.sort(key=lambda row: int(row["id"]))

    expected = [result_record(p) for p in Classifier.load(str(tiny_checkpoint), options).classify(texts)]
    assert [int(row["id"]) for row in rows] == list(range(300))
    assert [row["text"] for row in rows] == texts
    assert [row["label"] for row in rows] == [r["label"] for r in expected]
    assert [int(row["tokens"]) for row in rows] == [r["tokens"] for r in expected]
    assert [row["truncated"].lower() == "true" for row in rows] == [r["truncated"] for r in expected]
    assert any(r["truncated"] for r in expected)
    for label in ("ham", "spam"):
        column = f"probability_{label}"
        assert [float(row[column]) for row in rows] == pytest.approx([r[column] for r in expected], abs=1e-6)


def test_the_default_pool_fits_the_free_cpus_beside_the_reads(local_ray):
    from training.scoring.ray_data import worker_count

    # an earlier test's actors give their CPUs back asynchronously after its pipeline ends: wait for an idle cluster
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_count(cpus_per_worker=1, gpus_per_worker=0) == 3  # 4 CPUs, one left for reads and writes
    assert worker_count(cpus_per_worker=2, gpus_per_worker=0) == 1
    assert worker_count(cpus_per_worker=1, gpus_per_worker=1) == 1  # no GPU here: still one worker, never none
