"""What the pipeline records of a run and reads back: the card's training record interpreted as the run's
arguments, and the precision that ran."""

import json

import pytest

from tests.helpers import edit_card, finetune_argv, pretend_cpu, write_messages_csv
from training.cli import main
from training.config import flatten
from training.finetune.pipeline import training_config
from training.runtime.checkpoint import load_checkpoint


def test_an_older_training_record_reads_with_the_options_added_since_at_their_defaults(tiny_checkpoint):
    training = {
        "trainable": "last-blocks", "trainable_blocks": 1, "lora_rank": 8, "lora_alpha": 16.0, "epochs": 5,
        "batch_size": 8, "lr": 5e-05, "weight_decay": 0.1, "seed": 123, "device": "auto", "cache_prefix": True,
        "data": "sms", "text_column": "text", "label_column": "label", "balance": "undersample", "preset": "gpt2",
        "init": "random", "weights": None, "tokenizer_dir": None, "max_tokens": 48,
        "cache_dir": "/cache", "out": "/models/spamgpt", "skip_existing": True,
    }  # fmt: skip
    edit_card(training=training)(tiny_checkpoint)
    config = training_config(load_checkpoint(tiny_checkpoint))
    assert config.data.data == "sms" and config.base.init == "random" and config.train.lr == 5e-05
    assert config.out == "/models/spamgpt" and config.skip_existing is True and config.balance == "undersample"
    # the options added since at their defaults; cache_dir (removed when the data moved into the package) dropped
    added = {"resume": False, "save_state": True, "base": None, "threshold_objective": "fpr", "target_fpr": 0.01}
    added |= {"feedback": None, "feedback_weight": 10, "compare_with": None, "force": False}
    kept = {name: value for name, value in training.items() if name != "cache_dir"}
    assert flatten(config) == kept | added | {"precision": "auto", "overwrite": False}


def test_a_checkpoint_not_written_by_finetune_has_no_training_config(tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint).card.training == {}
    assert training_config(load_checkpoint(tiny_checkpoint)) is None


@pytest.mark.parametrize(
    ("record", "match"),
    [
        pytest.param({"epochs": 0}, r"'training' record \(epochs must be at least 1, got 0\)", id="0"),
        pytest.param({"epochs": "5"}, r"'training' record \(epochs must be int, got '5'\)", id="str"),
        pytest.param({"epochs": 2.5}, r"epochs must be int, got 2\.5", id="float-epochs"),
        pytest.param({"lr": True}, r"lr must be float, got True", id="bool-lr"),
        pytest.param({"balance": True}, r"balance must be str, got True", id="bool-balance"),
        pytest.param({"precision": "float16"}, r"precision must be one of .* got 'float16'", id="precision"),
    ],
)
def test_a_bad_training_record_is_refused_naming_the_file(tiny_checkpoint, record, match):
    edit_card(training=record)(tiny_checkpoint)
    checkpoint = load_checkpoint(tiny_checkpoint)  # serving never reads the record
    with pytest.raises(ValueError, match=r"config\.json: invalid 'training' record"):
        training_config(checkpoint)
    with pytest.raises(ValueError, match=match):
        training_config(checkpoint)


@pytest.mark.parametrize("flags", [("avx2",), ("avx2", "avx512f", "avx512_bf16")])
def test_the_card_records_the_precision_that_ran(tmp_path, bpe_dir, monkeypatch, flags, capsys):
    pretend_cpu(monkeypatch, *flags)
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = finetune_argv(data, bpe_dir, tmp_path / "auto", "--epochs", "1")
    assert main(argv) == 0
    assert load_checkpoint(tmp_path / "auto").card.training["precision"] == "float32"  # auto, on any CPU
    bfloat16 = finetune_argv(data, bpe_dir, tmp_path / "bf16", "--epochs", "1", "--precision", "bfloat16")
    if "avx512_bf16" in flags:
        assert main(bfloat16) == 0
        assert json.loads((tmp_path / "bf16" / "config.json").read_text())["training"]["precision"] == "bfloat16"
    else:
        assert main(bfloat16) == 1
        assert "precision 'bfloat16' needs a device that computes it natively" in capsys.readouterr().err
        assert not (tmp_path / "bf16").exists()
