"""Training over processes with torchrun: two CPU processes (gloo) reach one process's weights for the same global
batches and seed, with shares of unequal size and a batch that leaves one process nothing; resume works across
process counts."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import finetune_argv, kill_after_steps, run_training, synthetic, write_messages_csv
from training.config import TrainConfig
from training.finetune.distributed import Group
from training.finetune.loop import train
from training.runtime.model import GPTClassifier, GPTConfig

# 66 rows: 46 in the training split, so batches of 5 give shares of 3 and 2 and a last batch of one row, where
# rank 1 has no row of its own (it runs a row at weight 0 to join the gradient sum)
ROWS, BATCH, EPOCHS, STEPS_PER_EPOCH = 66, 5, 3, 10
N_EMBD = GPTConfig.from_preset("tiny").n_embd


def assert_same_training(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Weights equal to float32 rounding: atol 1e-6, rtol 1e-5, except the attention key biases. Their true
    gradient is zero (a constant added to every key's score leaves softmax unchanged), so each run moves them by
    rounding noise that Adam scales up to steps of about the learning rate (1e-3): those within atol 1e-3."""
    assert got.keys() == expected.keys()
    for name in expected:
        a, b = got[name], expected[name]
        if name.endswith("attn.c_attn.bias"):
            keys = slice(N_EMBD, 2 * N_EMBD)  # c_attn's output is q, k, v
            torch.testing.assert_close(a[keys], b[keys], atol=1e-3, rtol=0, msg=name)
            a, b = torch.cat([a[:N_EMBD], a[2 * N_EMBD :]]), torch.cat([b[:N_EMBD], b[2 * N_EMBD :]])
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_messages_csv(tmp_path_factory.mktemp("data") / "messages.csv", ROWS)


def argv(data: Path, bpe_dir: Path, out: Path, *extra: str) -> list[str]:
    return finetune_argv(data, bpe_dir, out, "--epochs", str(EPOCHS), "--batch-size", str(BATCH), *extra)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data, bpe_dir) -> Path:
    out = tmp_path_factory.mktemp("one") / "ckpt"
    run_training(argv(data, bpe_dir, out))
    return out


def test_two_processes_match_one(one_process, data, bpe_dir, tmp_path):
    card = json.loads((one_process / "config.json").read_text())
    assert card["data"]["split"]["train"] == 46 and 46 % BATCH == 1  # the cases the module docstring names
    out = tmp_path / "ckpt"
    printed = run_training(argv(data, bpe_dir, out), processes=2)
    assert printed.count("epoch 3:") == 1 and printed.count("checkpoint exported") == 1  # rank 0 alone reports
    assert_same_training(load_file(out / "model.safetensors"), load_file(one_process / "model.safetensors"))
    history = [json.loads((d / "report" / "metrics.json").read_text())["history"] for d in (out, one_process)]
    assert history[0]["best_epoch"] == history[1]["best_epoch"]
    for two, one in zip(history[0]["epochs"], history[1]["epochs"], strict=True):
        assert two == pytest.approx(one, rel=1e-5)  # losses summed over ranks in another order


def test_resume_under_torchrun(one_process, data, bpe_dir, tmp_path):
    """A one-process run killed in epoch 2 continues over two processes to the one-process result."""
    out = tmp_path / "ckpt"
    kill_after_steps(argv(data, bpe_dir, out), STEPS_PER_EPOCH + 3, tmp_path / "killed.log")
    printed = run_training(argv(data, bpe_dir, out, "--resume"), processes=2)
    assert "resuming after epoch 1" in printed and "epoch 1:" not in printed
    assert_same_training(load_file(out / "model.safetensors"), load_file(one_process / "model.safetensors"))


def test_group_shares():
    rows = list(range(7))
    shares = [Group(rank, 3).share(rows) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert Group(1, 2, local_rank=1).place(torch.device("cuda")) == torch.device("cuda", 1)
    assert Group(1, 2).place(torch.device("cpu")) == torch.device("cpu")
    assert Group().place(torch.device("cuda")) == torch.device("cuda")


def test_batch_smaller_than_the_processes_is_refused():
    model = GPTClassifier(GPTConfig.from_preset("tiny", vocab_size=100))
    config = TrainConfig(batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="batch_size 2 is below the 4 processes"):
        train(model, synthetic(8, seed=0), synthetic(4, seed=1), config, group=Group(0, 4))
