"""What bad e-mail costs training.runtime.mail.read_message: each input of docs/mail.md's bad-input list read in a
process of its own: its seconds and the process's peak resident memory above what it held before (ru_maxrss), then,
read again under tracemalloc, the peak of Python's allocations while reading.

    python -m benchmarks.mail_bad_input

Results go to benchmarks/results/mail_bad_input.json. Every input is built here; none needs data.
"""

import base64
import multiprocessing
import resource
import time
import tracemalloc

from benchmarks.common import print_table, write_result
from training.runtime.mail import read_message


def nested(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ninnermost" + tail


def with_attachment(size: int) -> bytes:
    return (
        b'Subject: files\r\nContent-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\n'
        b"see attached\r\n--a\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + base64.encodebytes(b"\0" * size)
        + b"\r\n--a--\r\n"
    )


CASES = {
    "empty (0 bytes)": lambda: b"",
    "NUL-filled (1 MiB)": lambda: b"\0" * (1 << 20),
    "not a message (1 MiB of words)": lambda: b"words and more words " * 50_000,
    "no readable part": lambda: (
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: image/gif\r\n\r\nGIF89a\r\n--x--'
    ),
    "10,000 nested multiparts": lambda: nested(10_000),
    "30 MB attachment": lambda: with_attachment(30_000_000),
    "1 MB Subject line": lambda: b"Subject: " + b"x" * 1_000_000 + b"\r\n\r\nbody",
    "1 MB Content-Type line": lambda: b"Content-Type: text/plain; " + b"a=b; " * 200_000 + b"\r\n\r\nbody",
    "4 MiB of 998-character Content-Type parts": lambda: (
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        + (b"--B\r\nContent-Type: text/plain; " + b"a=b; " * 195 + b"\r\n\r\nx\r\n") * 4000
        + b"--B--\r\n"
    ),
    "encoded word, unknown charset": lambda: b"Subject: =?x-unknown?q?caf=E9?=\r\n\r\nbody",
    "1 MiB HTML body": lambda: b"Content-Type: text/html\r\n\r\n" + b"<div><b>x</b> y</div>" * 50_000,
}


def measure(name: str, queue: multiprocessing.Queue) -> None:
    raw = CASES[name]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    mail = read_message(raw)
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # a second read, traced: tracemalloc slows allocation-heavy code many times over
    read_message(raw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    queue.put(
        {
            "input": name,
            "bytes": len(raw),
            "seconds": seconds,
            "traced_peak_mib": peak / 2**20,
            "rss_peak_over_start_mib": (after - before) / 1024,
            "text_chars": len(mail.text),
            "defects": mail.defects,
            "attachments": len(mail.attachments),
        }
    )


def main() -> None:
    context = multiprocessing.get_context("spawn")
    rows = []
    for name in CASES:
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    print_table(rows)
    print(f"wrote {write_result('mail_bad_input', {'cases': rows})}")


if __name__ == "__main__":
    main()
