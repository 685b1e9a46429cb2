"""Several classifiers on one base: the time to ask N of them about each text, and the memory N of them hold, with
the prefix shared (training.runtime.shared.SharedClassifiers) against N separate engines, for N = 1, 2, 4, 8.

    python -m benchmarks.many_models [--texts 48] [--batch-size 16] [--rounds 2]

Weights: the GPT-2 124M architecture with random (seeded) weights and the real BPE, its last block trainable: eight
checkpoints that hold the same embeddings and first 11 blocks (seed 0) and each its own last block, final norm and
head (seeds 1..8), with the fingerprint of that prefix in their cards, written once to
benchmarks/checkpoints/many-models (git-ignored). Every classifier is loaded from its checkpoint as the server loads
it (Classifier.load, float32, packed linear layers).

Time: the same real SMS texts, tokenized once, in length-sorted batches of --batch-size; each contender asks its N
classifiers about every batch: shared, one SharedClassifiers.predict_logits call (the prefix once, then N tails);
separate, Classifier.predict_logits of N engines in turn (one engine asked N times: the same compute, without
holding N copies in this process). Contenders are interleaved round by round in one
process (benchmarks.common.time_interleaved), so load on the machine falls on all alike; the ratios are to one
engine asked alone in the same run. Memory: each case loads its N classifiers in a fresh process, runs one batch
and reports its resident memory (VmRSS) and its peak (VmHWM); a process that imports the same modules and loads
nothing gives the floor.

Targets: asking 4 classifiers costs at most 1.25x the time of asking one, 8 at most 1.5x; the memory of 8 at most
1.3x that of one.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    BPE_DIR,
    ROOT,
    count,
    print_table,
    require_shared_data,
    rss_mib,
    sample_texts,
    time_interleaved,
    write_result,
)
from training.config import MAX_TOKENS
from training.runtime.checkpoint import CheckpointError, ModelCard, load_checkpoint, save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import length_sorted_batches
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.options import ClassifierOptions
from training.runtime.prefix import fingerprint
from training.runtime.shared import SharedClassifiers
from training.runtime.tokenizer import bpe_hashes

CHECKPOINTS = ROOT / "benchmarks" / "checkpoints" / "many-models"
COUNTS = (1, 2, 4, 8)
TRAINABLE_BLOCKS = 1  # the product's default: the last block, the final norm and the head train
TARGETS = {"time_4": 1.25, "time_8": 1.5, "memory_8": 1.3}


def checkpoint_paths(n: int = max(COUNTS)) -> list[Path]:
    return [CHECKPOINTS / f"m{i}" for i in range(1, n + 1)]


def sibling_checkpoints() -> list[Path]:
    """checkpoint_paths: checkpoints sharing a seeded random 124M prefix, each with its own seeded tail; written once
    and reused while this spamgpt loads them."""
    paths = checkpoint_paths()
    try:
        for path in paths:
            load_checkpoint(path)
        return paths
    except CheckpointError:
        pass
    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig.from_preset("gpt2"))
    blocks = model.config.n_layer - TRAINABLE_BLOCKS
    tail = [*model.transformer.h[blocks:], model.transformer.ln_f, model.score]
    prefix = fingerprint(model.state_dict(), model.config, bpe_hashes(BPE_DIR), blocks)
    for seed, path in enumerate(paths, start=1):
        torch.manual_seed(seed)
        for module in tail:
            module.apply(model._init_weights)
            if isinstance(module, torch.nn.LayerNorm):  # its gain and bias: random too, so each tail differs
                torch.nn.init.normal_(module.weight, 1.0, 0.02), torch.nn.init.normal_(module.bias, 0.0, 0.02)
        card = ModelCard(("ham", "spam"), MAX_TOKENS, None, "gpt2 (random weights)", prefix=prefix)
        save_checkpoint(path, model, BPE_DIR, card)
        print(f"wrote {path}", flush=True)
    return paths


def load(paths: list[Path]) -> list[Classifier]:
    options = ClassifierOptions(device="cpu")
    return [Classifier.load(path, options) for path in paths]


def measure_time(paths: list[Path], n_texts: int, batch_size: int, rounds: int) -> dict[str, float]:
    """Seconds each contender spends asking its classifiers about every batch, interleaved in this process. The
    separate engines' compute is one engine's forward pass N times (their memory, N copies, is memory_case's)."""
    engine = load(paths[:1])[0]
    group = SharedClassifiers()
    for i, path in enumerate(paths):
        group.add(f"m{i}", load([path])[0])
    rows, _ = engine.tokenize(sample_texts(n_texts, seed=0))
    batches = [[rows[i] for i in b] for b in length_sorted_batches([len(r) for r in rows], batch_size)]

    def shared(n: int):
        names = group.names[:n]
        return lambda batch: group.predict_logits(dict.fromkeys(names, batch))

    def engines(n: int):
        return lambda batch: [engine.predict_logits(batch) for _ in range(n)]

    contenders = {"one engine": (engines(1), batches)}
    for n in COUNTS:
        contenders[f"shared {n}"] = (shared(n), batches)
        if n > 1:
            contenders[f"separate {n}"] = (engines(n), batches)
    return time_interleaved(contenders, rounds)


def measure_memory(paths: list[Path], shared: bool) -> dict:
    """In this (fresh) process: load the classifiers (shared or separate), run one batch; VmRSS and VmHWM in MiB."""
    rows = [[464, 3797, 318, 257, 1332]] * 4
    if shared:  # each joins as it loads, as a server adds them: the prefix it brings is dropped at once
        group = SharedClassifiers()
        for i, path in enumerate(paths):
            group.add(f"m{i}", load([path])[0])
        group.predict_logits(dict.fromkeys(group.names, rows))
    else:
        classifiers = load(paths)
        for classifier in classifiers:
            classifier.predict_logits(rows)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"rss_mib": rss_mib(os.getpid()), "peak_mib": int(status["VmHWM"].split()[0]) / 1024}


def memory_case(n: int, shared: bool) -> dict:
    """measure_memory of the first n checkpoints in a fresh interpreter."""
    argv = [sys.executable, "-m", "benchmarks.many_models", "--child", json.dumps({"n": n, "shared": shared})]
    child = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"memory case n={n} shared={shared} failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def memory_cases() -> dict[str, dict]:
    """{"floor", "shared N", "separate N"}: memory_case of each, N in COUNTS (one classifier is one case)."""
    memory = {"floor": memory_case(0, False)}
    for n in COUNTS:
        memory[f"shared {n}"] = memory_case(n, True)
        memory[f"separate {n}"] = memory_case(n, False) if n > 1 else memory["shared 1"]
        print(f"memory of {n}: shared {memory[f'shared {n}']}, separate {memory[f'separate {n}']}", flush=True)
    return memory


def table(memory: dict | None, seconds: dict | None, texts: int) -> list[dict]:
    """One row per count and mode, with the parts measured (None: not measured in this run)."""
    rows = []
    for n in COUNTS:
        for mode in ("shared", "separate"):
            row = {"classifiers": n, "mode": mode}
            if seconds is not None:
                took = seconds[f"{mode} {n}" if n > 1 or mode == "shared" else "one engine"]
                row |= {"s": took, "texts/s": texts / took, "time x one": took / seconds["one engine"]}
            if memory is not None:
                rss, one, floor = (memory[k]["rss_mib"] for k in (f"{mode} {n}", "shared 1", "floor"))
                row |= {
                    "RSS MiB": rss,
                    "peak MiB": memory[f"{mode} {n}"]["peak_mib"],
                    "RSS x one": rss / one,
                    "beyond floor x one": (rss - floor) / (one - floor),
                }
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=count, default=48, help="real SMS texts each classifier is asked about")
    parser.add_argument("--batch-size", type=count, default=16, help="texts per batch, as a micro-batcher forms them")
    parser.add_argument("--rounds", type=count, default=2, help="interleaved rounds over the batches")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("memory", "time"),
        default=["memory", "time"],
        help="what to measure; a run of one part writes results/many_models_<part>.json",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one memory case in this process
    args = parser.parse_args(argv)
    require_shared_data()
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(measure_memory(checkpoint_paths(case["n"]), case["shared"])))
        return
    paths = sibling_checkpoints()
    memory = memory_cases() if "memory" in args.parts else None
    seconds = measure_time(paths, args.texts, args.batch_size, args.rounds) if "time" in args.parts else None
    rows = table(memory, seconds, args.texts)  # the rounds split the batches: each runs once
    print_table(rows)
    shared = {r["classifiers"]: r for r in rows if r["mode"] == "shared"}
    checks = {"time_4": (4, "time x one"), "time_8": (8, "time x one"), "memory_8": (8, "RSS x one")}
    verdicts = {}
    for name, (n, column) in checks.items():
        if column in shared[n]:
            measured = shared[n][column]
            verdicts[name] = {"measured": measured, "target": TARGETS[name], "met": measured <= TARGETS[name]}
            print(
                f"{name}: {measured:.3f}x, target at most {TARGETS[name]}x: "
                + ("met" if verdicts[name]["met"] else "MISSED")
            )
    path = write_result(
        "many_models" if len(set(args.parts)) == 2 else f"many_models_{args.parts[0]}",
        {
            "weights": "gpt2 124M architecture, random (seeded) weights, real GPT-2 BPE; 8 checkpoints sharing the "
            "embeddings and first 11 blocks (seed 0), each with its own last block, final norm and head (seeds 1..8)",
            "texts": args.texts,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "floor_rss_mib": None if memory is None else memory["floor"]["rss_mib"],
            "rows": rows,
            "targets": verdicts,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
