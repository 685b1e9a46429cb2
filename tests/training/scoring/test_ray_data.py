"""Ray Data scoring on a local Ray cluster (this machine only) gives the single-process results. Skips without the
`ray` extra; CI installs it for this test."""

import csv
import random
from pathlib import Path

import pytest

from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.scoring.records import result_record

ray = pytest.importorskip("ray")
ray_data = pytest.importorskip("ray.data")
ROOT = Path(__file__).resolve().parents[3]
WORDS = ["win", "prize", "cash", "see", "you", "at", "lunch", "free", "call", "now", "mum", "thanks", "ok", "£1000"]


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
