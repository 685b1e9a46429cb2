"""Training a sibling (`finetune --prefix-from`): a new classifier on an existing checkpoint's frozen prefix, other
labels, the same fingerprint, and the two served from one prefix."""

import csv
import random
import re

import pytest
import torch

from tests.helpers import finetune_argv, write_messages_csv
from training.cli import main
from training.runtime.checkpoint import load_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.runtime.prefix import prefix_keys
from training.runtime.shared import SharedClassifiers

TOPICS = {"travel": ["train", "bus", "station", "late"], "food": ["dinner", "lunch", "pizza", "eat"]}


def write_topics_csv(path, n: int = 48, seed: int = 1):
    """`n` unique short texts labelled with three topics, from different words."""
    rng, topics = random.Random(seed), {**TOPICS, "money": ["cash", "bank", "pay", "bill"]}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = list(topics)[i % 3]
            writer.writerow([" ".join(rng.sample(topics[label], 3)) + f" {i}", label])
    return path


def sibling_argv(data, base, out, *extra: str) -> list[str]:
    return [
        "finetune", "--prefix-from", str(base), "--data", str(data), "--out", str(out), "--epochs", "2",
        "--lr", "1e-3", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture
def base(tmp_path, bpe_dir):
    """A tiny random classifier of ham and spam, its last block trained: the first block and embeddings frozen."""
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    assert main(finetune_argv(data, bpe_dir, tmp_path / "spam", "--epochs", "1")) == 0
    return tmp_path / "spam"


def test_a_sibling_on_other_labels_keeps_the_prefix_and_shares_it_when_served(tmp_path, base):
    data = write_topics_csv(tmp_path / "topics.csv")
    assert main(sibling_argv(data, base, tmp_path / "topics")) == 0
    spam, topics = load_checkpoint(base), load_checkpoint(tmp_path / "topics")
    assert topics.card.labels == ("food", "money", "travel") and topics.card.max_tokens == spam.card.max_tokens
    assert topics.card.prefix == spam.card.prefix and topics.card.prefix.blocks == 1
    assert topics.card.base_model == spam.card.base_model
    mine, theirs = topics.model.state_dict(), spam.model.state_dict()
    for key in prefix_keys(list(mine), 1):
        assert torch.equal(mine[key], theirs[key]), key
    assert not torch.equal(mine["transformer.h.1.mlp.c_fc.weight"], theirs["transformer.h.1.mlp.c_fc.weight"])

    options = ClassifierOptions(device="cpu")
    paths = {"spam": base, "topics": tmp_path / "topics"}
    group = SharedClassifiers({name: Classifier.load(path, options) for name, path in paths.items()})
    assert group.sharing("topics") == ["spam", "topics"]
    rows = group.tokenize(["dinner at the station", "claim your cash now"], ["spam", "topics"])
    logits = group.predict_logits({name: r for name, (r, _) in rows.items()})
    assert logits["spam"].shape == (2, 2) and logits["topics"].shape == (2, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(("--trainable", "all"), r"a sibling must leave exactly those frozen: --trainable last-blocks "
                     r"--trainable-blocks 1 \(this run would freeze nothing\)", id="all"),
        pytest.param(("--trainable-blocks", "2"), r"this run would freeze the embeddings and the first 0 blocks",
                     id="other-blocks"),
        pytest.param(("--tokenizer-dir", "x"), r"brings its weights and tokenizer: drop \['--tokenizer-dir'\]",
                     id="tokenizer"),
        pytest.param(("--max-tokens", "65"), r"--max-tokens must lie in 1..64 for --prefix-from", id="max-tokens"),
    ],
)  # fmt: skip
def test_a_sibling_that_would_not_share_the_prefix_is_refused(tmp_path, base, capsys, extra, message):
    data = write_topics_csv(tmp_path / "topics.csv")
    try:
        code = main(sibling_argv(data, base, tmp_path / "topics", *extra))
    except SystemExit as exc:  # arguments that contradict each other: argparse's usage error
        code = exc.code
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "topics").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: p.write_text("text,label\n"), "{p}: not a directory", id="a-file"),
        pytest.param(lambda p: p.mkdir(), "{p}/config.json: missing", id="no-config"),
        pytest.param(lambda p: None, "{p}: checkpoint directory not found", id="nothing"),
    ],
)
def test_a_prefix_from_that_is_no_checkpoint_is_named_with_the_option(tmp_path, capsys, make, message):
    make(source := tmp_path / "draft")
    assert main(sibling_argv(write_topics_csv(tmp_path / "t.csv"), source, tmp_path / "topics")) != 0
    assert f"--prefix-from {str(source)!r}: {message.format(p=source)}" in capsys.readouterr().err


@pytest.mark.parametrize(("trainable", "blocks"), [("all", None), ("lora", 0), ("last-blocks", 1)])
def test_the_card_records_what_stayed_frozen(tmp_path, bpe_dir, trainable, blocks):
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    assert main(finetune_argv(data, bpe_dir, tmp_path / "out", "--epochs", "1", "--trainable", trainable)) == 0
    prefix = load_checkpoint(tmp_path / "out").card.prefix
    assert (None if prefix is None else prefix.blocks) == blocks


def test_a_base_that_froze_nothing_has_no_prefix_to_give(tmp_path, bpe_dir, capsys):
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    assert main(finetune_argv(data, bpe_dir, tmp_path / "all", "--epochs", "1", "--trainable", "all")) == 0
    assert main(sibling_argv(write_topics_csv(tmp_path / "t.csv"), tmp_path / "all", tmp_path / "topics")) != 0
    assert "records no frozen prefix: every weight of it was trained (--trainable all)" in capsys.readouterr().err


def test_skip_existing_retrains_a_sibling_whose_base_prefix_changed(tmp_path, base, bpe_dir, capsys):
    data = write_topics_csv(tmp_path / "topics.csv")
    argv = sibling_argv(data, base, tmp_path / "topics", "--skip-existing")
    assert main(argv) == 0
    assert main(argv) == 0 and "skip: " in capsys.readouterr().out
    messages = write_messages_csv(tmp_path / "messages.csv", n=40)
    assert main(finetune_argv(messages, bpe_dir, base, "--epochs", "1", "--seed", "7", "--overwrite")) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "was trained on another prefix than --prefix-from's now" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "topics").card.prefix == load_checkpoint(base).card.prefix
