"""The feedback store's write rate with durable commits (training.runtime.feedback: WAL, synchronous=FULL, one fsync
per report) on this machine's disk: one writer, several threads sharing one store (the server's case: one connection
behind a lock), and several processes each with its own connection to the same file (SQLite's file lock).

    python -m benchmarks.feedback_store                       # 3 rounds of 300 reports per contender
    python -m benchmarks.feedback_store --reports 1000 --writers 8 --directory /var/lib/spamgpt

The contenders run interleaved, round after round, so that a machine whose load changes meanwhile weighs on each
alike; the table gives each one's median over the rounds. Reports are distinct texts of SMS length, each a new
correction (an INSERT into the corrections and one into the history, in one transaction).
"""

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import count, print_table, write_result
from training.runtime.feedback import FeedbackStore

LABELS = ("ham", "spam")


def text(writer: int, i: int) -> str:
    return f"writer {writer} report {i}: WINNER!! You have been selected for a free prize, call 0800 now to claim"


def write(path: Path, writer: int, count: int, store: FeedbackStore | None = None) -> None:
    """`count` reports by one writer, on `store` or on a store of its own at `path`."""
    own = store is None
    store = FeedbackStore(path, LABELS) if own else store
    for i in range(count):
        store.record(text(writer, i), LABELS[i % 2])
    if own:
        store.close()


def one_writer(path: Path, reports: int, writers: int) -> None:
    write(path, 0, reports)


def threads(path: Path, reports: int, writers: int) -> None:
    with FeedbackStore(path, LABELS) as store:
        pool = [threading.Thread(target=write, args=(path, w, reports // writers, store)) for w in range(writers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()


def processes(path: Path, reports: int, writers: int) -> None:
    FeedbackStore(path, LABELS).close()  # the schema, before the writers race to create it
    pool = [multiprocessing.Process(target=write, args=(path, w, reports // writers)) for w in range(writers)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
        assert p.exitcode == 0, f"writer process exited {p.exitcode}"


CONTENDERS = {"1 writer": one_writer, "threads, one store": threads, "processes, own stores": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=count, default=300, help="reports per contender per round")
    parser.add_argument("--writers", type=count, default=4, help="threads or processes of the concurrent contenders")
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--directory", type=Path, default=None, help="where the databases go (default: a temp dir)")
    args = parser.parse_args()
    rates = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(dir=args.directory) as directory:
        for round_ in range(args.rounds):
            for name, contender in CONTENDERS.items():
                path = Path(directory) / f"{round_}-{name.replace(' ', '-').replace(',', '')}.db"
                start = time.perf_counter()
                contender(path, args.reports, args.writers)
                elapsed = time.perf_counter() - start
                with FeedbackStore(path, LABELS) as store:
                    written = store.stats().reports
                assert written == args.reports - args.reports % (1 if name == "1 writer" else args.writers), written
                rates[name].append(written / elapsed)
        filesystem = Path(directory)
    rows = [
        {
            "contender": name,
            "writers": 1 if name == "1 writer" else args.writers,
            "reports_per_s": statistics.median(values),
            "ms_per_report": 1000 / statistics.median(values),
            "rounds": values,
        }
        for name, values in rates.items()
    ]
    print_table([{k: v for k, v in row.items() if k != "rounds"} for row in rows])
    settings = {**vars(args), "directory": str(filesystem.parent), "durability": "WAL, synchronous=FULL"}
    print(f"written to {write_result('feedback_store', {'settings': settings, 'results': rows})}")


if __name__ == "__main__":
    main()
