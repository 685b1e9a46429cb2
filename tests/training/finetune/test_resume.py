"""Resuming an interrupted fine-tune: the loop continues bit for bit from a saved TrainState, the state goes to disk
and back unchanged (safetensors + JSON), a state of other arguments or data is refused, and a real training
process killed with SIGKILL mid-epoch, then resumed, ends with the uninterrupted run's weights exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

import training.finetune.pipeline
from tests.helpers import finetune_argv, kill_after_steps, run_training, synthetic, write_messages_csv
from training.cli import main
from training.config import TrainConfig
from training.finetune.loop import History, TrainState, train
from training.finetune.resume import ResumeError, load_state, save_state, state_dir
from training.runtime.model import GPTClassifier, GPTConfig

CONFIG = GPTConfig.from_preset("tiny", vocab_size=100)
RECORD = {"arguments": {"lr": 1e-3, "epochs": 3}, "data": {"sha256": "ab", "rows": 40}}


def fresh_model() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(CONFIG)


def run(config: TrainConfig, **kwargs) -> tuple[dict, list[TrainState], History]:
    """Train a fresh tiny model; its final weights, the state after every epoch, and its history (with every
    step's loss)."""
    states, model = [], fresh_model()
    # flip: validation loss rises, so the best epoch (1) is not the last one and the state keeps both weights
    history = train(
        model, synthetic(40, seed=1), synthetic(10, seed=2, flip=True), config, **kwargs, on_epoch_end=states.append
    )
    return model.state_dict(), states, history


@pytest.mark.parametrize(
    "trainable",
    [
        pytest.param({"trainable": "last-blocks"}, id="last-block-cached-prefix"),
        pytest.param({"trainable": "all"}, id="all"),
        pytest.param({"trainable": "lora", "lora_rank": 4, "lr": 5e-3}, id="lora"),
    ],
)
def test_resume_from_saved_state_is_bit_exact(trainable, tmp_path):
    config = TrainConfig(**{"lr": 1e-2, **trainable}, epochs=3, batch_size=6, device="cpu")
    weights, states, history = run(config)
    assert [s.epoch for s in states] == [1, 2, 3] and history.best_epoch == 1
    save_state(tmp_path, states[1], RECORD)  # after epoch 2, as a killed run would have left it
    resumed_weights, resumed_states, resumed_history = run(config, resume_from=load_state(tmp_path, RECORD))
    assert [s.epoch for s in resumed_states] == [3]
    torch.testing.assert_close(resumed_weights, weights, rtol=0, atol=0)
    assert resumed_history == history  # every step's loss, every epoch's metrics, the best epoch


def test_state_round_trips_and_replaces_the_previous_epoch(tmp_path):
    _, states, _ = run(TrainConfig(trainable="all", epochs=2, batch_size=6, lr=1e-2, device="cpu"))
    for state in states:
        save_state(tmp_path, state, RECORD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.safetensors", "state.json"]
    loaded = load_state(tmp_path, RECORD)
    saved = states[1]
    assert loaded.epoch == 2 and loaded.best_loss == saved.best_loss and loaded.history == saved.history
    torch.testing.assert_close(loaded.weights, saved.weights, rtol=0, atol=0)
    torch.testing.assert_close(loaded.best_weights, saved.best_weights, rtol=0, atol=0)
    torch.testing.assert_close(loaded.rng, saved.rng, rtol=0, atol=0)
    torch.testing.assert_close(loaded.optimizer["state"], saved.optimizer["state"], rtol=0, atol=0)
    assert json.loads(json.dumps(saved.optimizer["param_groups"])) == loaded.optimizer["param_groups"]
    assert load_state(tmp_path / "nothing", RECORD) is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        pytest.param(
            {**RECORD, "arguments": {"lr": 2e-3, "epochs": 3}}, r"other arguments \(lr 0.001 -> 0.002\)", id="lr"
        ),
        pytest.param({**RECORD, "arguments": {"lr": 1e-3}}, r"epochs 3 -> None", id="missing"),
        pytest.param({**RECORD, "data": {"sha256": "cd", "rows": 40}}, "other data", id="data"),
    ],
)
def test_state_of_another_run_is_refused(tmp_path, record, message):
    _, states, _ = run(TrainConfig(epochs=1, batch_size=6, device="cpu"))
    save_state(tmp_path, states[0], RECORD)
    with pytest.raises(ResumeError, match=message):
        load_state(tmp_path, record)


def test_a_state_whose_tensor_file_is_gone_or_not_a_file_is_refused_naming_it(tmp_path):
    _, states, _ = run(TrainConfig(epochs=1, batch_size=6, device="cpu"))
    save_state(tmp_path, states[0], RECORD)
    (tensors,) = tmp_path.glob("*.safetensors")
    tensors.unlink()
    with pytest.raises(ResumeError, match=rf"{tensors.name}: missing$"):
        load_state(tmp_path, RECORD)
    tensors.mkdir()  # as a FIFO would be, which opening would wait on
    with pytest.raises(ResumeError, match=rf"{tensors.name}: not a regular file$"):
        load_state(tmp_path, RECORD)


# --- A real process, killed ---------------------------------------------------------------------------------


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, bpe_dir, capsys):
    data = write_messages_csv(tmp_path / "messages.csv")  # 42 training rows: 6 batches of 8 an epoch
    argv = finetune_argv(data, bpe_dir, tmp_path / "out", "--epochs", "4", "--batch-size", "8")
    kill_after_steps(argv, 2 * 6 + 3, tmp_path / "killed.log")  # halfway through epoch 3
    state = state_dir(tmp_path / "out")
    assert json.loads((state / "state.json").read_text())["epoch"] == 2
    assert not (tmp_path / "out").exists(), "a killed run left something where the checkpoint goes"

    # Resuming with other arguments is refused and leaves the state alone
    assert main([*argv, "--resume", "--lr", "2e-3"]) == 1
    assert "other arguments (--lr 0.001 -> 0.002)" in capsys.readouterr().err
    # The resumed and the reference run in processes like the killed one's (same threads, same arithmetic)
    resumed = run_training([*argv, "--resume"])
    assert f"resuming after epoch 2 from {state}" in resumed
    assert "epoch 1:" not in resumed and "epoch 4:" in resumed
    assert not state.exists(), "the state of a finished run was kept"
    reference = tmp_path / "reference"
    run_training(finetune_argv(data, bpe_dir, reference, "--epochs", "4", "--batch-size", "8"))
    # The same arithmetic in the same order: equal to the last bit
    torch.testing.assert_close(
        load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors"), rtol=0, atol=0
    )
    history = [
        json.loads((d / "report" / "metrics.json").read_text())["history"] for d in (tmp_path / "out", reference)
    ]
    assert history[0] == history[1]


def test_resume_without_state_trains_from_the_start_and_no_save_state_saves_nothing(
    tmp_path, bpe_dir, monkeypatch, capsys
):
    monkeypatch.setattr(training.finetune.pipeline, "save_state", lambda *args: pytest.fail("state saved"))
    data = write_messages_csv(tmp_path / "messages.csv")
    out = tmp_path / "out"
    assert main(finetune_argv(data, bpe_dir, out, "--epochs", "1", "--resume", "--no-save-state")) == 0
    assert f"no saved state at {state_dir(out)}; training from the start" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not state_dir(out).exists()
