import csv
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import training.finetune.pipeline
from tests.helpers import (
    DELETE,
    HAM_WORDS,
    ROOT,
    SPAM_WORDS,
    edit_card,
    finetune_argv,
    pretend_cpu,
    write_messages_csv,
)
from training.cli import flag_names, main
from training.config import BaseModelConfig, DataConfig, FinetuneConfig, TrainConfig
from training.finetune.pipeline import ReplaceRefused, finetune, training_config
from training.finetune.resume import state_dir
from training.runtime.checkpoint import load_checkpoint
from training.runtime.inference import Threshold, predict_logits, probabilities
from training.runtime.tokenizer import encode_batch


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    return write_messages_csv(tmp_path_factory.mktemp("data") / "messages.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, csv_data, bpe_dir) -> Path:
    out = tmp_path_factory.mktemp("run") / "ckpt"
    assert main(finetune_argv(csv_data, bpe_dir, out)) == 0
    return out


def test_finetune_exports_a_loadable_checkpoint(trained, capsys):
    checkpoint = load_checkpoint(trained)
    card = checkpoint.card
    assert card.labels == ("ham", "spam") and card.max_tokens == 48
    assert card.base_model == "tiny (random init)"
    assert card.threshold.label == "spam" and 0 <= card.threshold.value <= 1
    assert card.training["epochs"] == 2 and card.training["seed"] == 123 and card.training["precision"] == "float32"
    assert card.training["balance"] == "undersample" and card.training["threshold_objective"] == "fpr"
    # 30 ham and 30 spam: undersampling leaves nothing out, so selection is validation and evaluation is test
    roles = {"train": 42, "validation": 6, "test": 12, "selection": 6, "evaluation": 12}
    assert card.data.split == roles and card.data.labels_before_balancing == {"ham": 30, "spam": 30}
    assert card.calibration.training_prior == {"ham": 0.5, "spam": 0.5} == card.calibration.prior
    assert card.calibration.temperature > 0
    assert card.data.fingerprint["rows"] == 60 and card.data.duplicates_dropped == {"exact": 0, "near": 0}
    assert card.metrics["best_epoch"] in (1, 2) and 0 <= card.metrics["test_accuracy"] <= 1
    report = trained / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test"]["argmax"]["n"] == 12 and len(metrics["history"]["epochs"]) == 2
    assert metrics["test"]["argmax"]["accuracy"] == card.metrics["test_accuracy"]
    split = json.loads((report / "split.json").read_text())
    ids = [set(split[name]) for name in ("train", "validation", "test")]
    assert [len(s) for s in ids] == [42, 6, 12] and len(set.union(*ids)) == 60
    assert set(split["selection"]) == ids[1] and set(split["evaluation"]) == ids[2]
    assert {p.name for p in report.glob("*.png")} >= {"loss.png", "confusion_matrix.png", "roc.png"}
    assert not list(trained.parent.glob(".ckpt.*")), "staging directory left behind"


def test_evaluate_command(trained, csv_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(trained), "--data", str(csv_data), "--split", "test", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    recorded = json.loads((trained / "report" / "metrics.json").read_text())["test"]
    # the same texts through the same code: the export reproduces the report's test metrics
    assert result["argmax"]["confusion_matrix"] == recorded["argmax"]["confusion_matrix"]
    assert result["threshold"]["accuracy"] == recorded["threshold"]["accuracy"]
    assert result["decision_threshold"] == json.loads((trained / "config.json").read_text())["threshold"]
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    spam = result["threshold"]["per_class"]["spam"]["rates"]["false_positive_rate"]
    assert f"({spam['count']:,} / {spam['of']:,})" in printed.split("spam: ")[-1]  # ham flagged, as counted


def test_the_threshold_decides_the_selection_rows_as_the_export_serves_them(trained, csv_data, tmp_path):
    """The threshold is chosen on the probabilities the exported head gives: re-evaluated, the selection rows
    it was chosen on fall on the same sides of it."""
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(trained), "--data", str(csv_data), "--split", "selection"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    recorded = json.loads((trained / "report" / "metrics.json").read_text())["selection"]["threshold"]
    assert json.loads(out.read_text())["threshold"]["confusion_matrix"] == recorded["confusion_matrix"]


def test_skip_existing(trained, csv_data, bpe_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    calls = []
    real_train = training.finetune.pipeline.train
    monkeypatch.setattr(training.finetune.pipeline, "train", lambda *a, **k: calls.append(a) or real_train(*a, **k))
    assert main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing")) == 0
    assert calls == [] and "skip" in capsys.readouterr().out
    assert main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing", "--epochs", "1")) == 0
    assert len(calls) == 1 and "other arguments (epochs)" in capsys.readouterr().out
    assert load_checkpoint(out).card.training["epochs"] == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # as if the file at the same path had changed
        pytest.param("fingerprint", {"sha256": "0" * 64, "rows": 60}, "trained on other data", id="other-data"),
        # as if deduplication had dropped other rows of the same file
        pytest.param("duplicates_dropped", {}, "deduplicated another way", id="other-deduplication"),
    ],
)
def test_skip_existing_retrains_on_other_data(
    trained, csv_data, bpe_dir, tmp_path, monkeypatch, capsys, field, value, message
):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    card = json.loads((out / "config.json").read_text())
    card["data"][field] = value
    (out / "config.json").write_text(json.dumps(card))
    monkeypatch.setattr(training.finetune.pipeline, "train", lambda *a, **k: pytest.fail("retrains"))
    with pytest.raises(pytest.fail.Exception, match="retrains"):
        main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing"))
    assert message in capsys.readouterr().out


def test_skip_existing_retrains_a_checkpoint_of_an_earlier_format(trained, csv_data, bpe_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    edit_card(format_version=1, calibration=DELETE)(out)
    assert main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing")) == 0
    assert "format_version 1 is no longer read" in capsys.readouterr().out
    assert load_checkpoint(out).card.calibration is not None


def test_crash_keeps_the_old_checkpoint(trained, csv_data, bpe_dir, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = (out / "model.safetensors").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(training.finetune.pipeline, "write_report", crash)
    assert main(finetune_argv(csv_data, bpe_dir, out, "--seed", "7", "--overwrite")) == 1
    assert (out / "model.safetensors").read_bytes() == before
    # no staging directory left; the resume state stays, for --resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [".copy.resume", "copy"]


def test_missing_weights_say_the_two_ways_out(csv_data, bpe_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    argv = ["finetune", "--preset", "gpt2", "--data", str(csv_data), "--tokenizer-dir", str(bpe_dir)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "openai-community/gpt2" in err and "network unreachable" in err
    assert "--weights PATH" in err and "--init random" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--epochs", "0"], "error: --epochs must be at least 1, got 0", id="epochs"),
        pytest.param(
            ["--max-tokens", "65"], "error: --max-tokens must lie in 1..64 for --preset 'tiny', got 65", id="max-tokens"
        ),
        pytest.param(
            ["--weights", "w.safetensors"],
            "error: --weights 'w.safetensors' has no use with --init random",
            id="weights",
        ),
        pytest.param(["--trainable", "some"], "invalid choice: 'some'", id="choice"),
        pytest.param(["--balance", "oversample"], "invalid choice: 'oversample'", id="balance"),
        pytest.param(["--target-fpr", "1.5"], "error: --target-fpr must lie in [0, 1), got 1.5", id="target-fpr"),
        pytest.param(
            ["--device", "cuda"],
            "error: --device 'cuda' requested but CUDA is not available",
            id="absent-cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
    ],
)
def test_bad_arguments(csv_data, bpe_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_argv(csv_data, bpe_dir, tmp_path / "out", *extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            ["--dtype", "float16"],
            "error: --dtype 'float16' is not supported on CPU; use float32",
            id="float16",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto is CUDA here"),
        ),
        pytest.param(
            ["--dtype", "bfloat16", "--quantize-int8"],
            "error: --quantize-int8 quantizes a float32 model, got --dtype 'bfloat16'; use --dtype auto or float32",
            id="int8-bfloat16",
        ),
    ],
)
def test_predict_refusals_name_its_flags(trained, csv_data, tmp_path, capsys, extra, message):
    """A refused option is named as the command line spells it, also where the rule is shared with the server."""
    argv = ["predict", "--checkpoint", str(trained), "--data", str(csv_data), "--out", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("weight_decay must not be negative", "--weight-decay must not be negative"),
        ("precision 'x' is not known; use precision auto", "--precision 'x' is not known; use --precision auto"),
        (
            "preset 'tiny' has no pretrained weights, or pick a preset of ['gpt2']",
            "--preset 'tiny' has no pretrained weights, or pick a preset of ['gpt2']",
        ),
        ("data/out.csv: cannot tell; '--out data' stays", "data/out.csv: cannot tell; '--out data' stays"),
    ],
)
def test_flag_names_spell_options_and_leave_words_values_and_paths(message, expected):
    assert flag_names(message, FinetuneConfig) == expected


def test_an_option_found_wrong_once_the_run_looks_is_named_as_its_flag(
    csv_data, bpe_dir, tmp_path, monkeypatch, capsys
):
    """bfloat16 fine-tuning on a CPU that would emulate it is refused when training starts, naming --precision."""
    pretend_cpu(monkeypatch, "avx2")
    assert main(finetune_argv(csv_data, bpe_dir, tmp_path / "out", "--precision", "bfloat16", "--device", "cpu")) == 1
    assert "error: --precision 'bfloat16' needs a device that computes it natively" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_other_files(csv_data, bpe_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(finetune_argv(csv_data, bpe_dir, tmp_path / "out")) == 1
    assert "holds files but no checkpoint" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_module_entry_point_exit_code(csv_data, bpe_dir, tmp_path):
    argv = finetune_argv(csv_data, bpe_dir, tmp_path / "out")
    argv[argv.index("random")] = "pretrained"
    argv += ["--weights", str(tmp_path / "nowhere")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "training", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert f"no GPT-2 weights at {tmp_path / 'nowhere'}" in done.stderr
    assert "--init random" in done.stderr


def test_three_labels_from_jsonl_with_lora(bpe_dir, tmp_path, capsys):
    rng = random.Random(1)
    words = {"spam": SPAM_WORDS, "ham": HAM_WORDS, "work": ["meeting", "report", "deadline", "boss", "email", "desk"]}
    data = tmp_path / "messages.jsonl"
    lines = [{"body": " ".join(rng.sample(words[k], 3)) + f" {i}", "kind": k} for i in range(20) for k in words]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = finetune_argv(data, bpe_dir, tmp_path / "out", "--text-column", "body", "--label-column", "kind")
    assert main([*argv, "--trainable", "lora", "--balance", "none"]) == 0
    checkpoint = load_checkpoint(tmp_path / "out")
    assert checkpoint.card.labels == ("ham", "spam", "work") and checkpoint.card.threshold is None
    assert checkpoint.card.metrics["f1_label"] == "macro"
    assert "F1 (macro)" in capsys.readouterr().out


@pytest.mark.parametrize("balancing", ["undersample", "class-weighted"])
def test_unbalanced_data_is_held_out_calibrated_and_thresholded(bpe_dir, tmp_path, balancing):
    """80 ham and 20 spam: the ham undersampling leaves out is held out; the card serves at the data's 80 / 20."""
    data = tmp_path / "messages.csv"
    rng = random.Random(2)
    rows = [(" ".join(rng.sample(HAM_WORDS, 4)) + f" {i}", "ham") for i in range(80)]
    rows += [(" ".join(rng.sample(SPAM_WORDS, 4)) + f" {i}", "spam") for i in range(20)]
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    out = tmp_path / "out"
    argv = finetune_argv(data, bpe_dir, out, "--balance", balancing, "--target-fpr", "0.05")
    assert main(argv) == 0
    card = load_checkpoint(out).card
    assert card.data.labels_before_balancing == {"ham": 80, "spam": 20}
    assert card.calibration.prior == {"ham": 0.8, "spam": 0.2}
    assert card.calibration.training_prior == {"ham": 0.5, "spam": 0.5}  # undersampled, or weighed to it
    # balanced 20 + 20 split 14 / 2 / 4 each; the 60 ham left out 42 / 6 / 12
    assert card.data.split["evaluation"] == 8 + 12 and card.data.split["test"] == 8
    assert card.data.split["train"] == (28 if balancing == "undersample" else 28 + 42)
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["threshold_rule"] == {"objective": "fpr", "target_fpr": 0.05}
    # the threshold's FPR on the selection rows meets the target
    assert report["selection"]["threshold"]["per_class"]["spam"]["rates"]["false_positive_rate"]["value"] <= 0.05
    assert report["evaluation"]["argmax"]["n"] == 20 and set(report["calibration"]) == {"ece_before", "ece_after", "n"}
    assert (out / "report" / "reliability.png").is_file()


def test_finetune_from_python_with_typed_configs(trained, csv_data, bpe_dir, tmp_path):
    """The pipeline without the command line: the same arguments as `trained`'s give the same checkpoint."""
    config = FinetuneConfig(
        DataConfig(str(csv_data)),
        BaseModelConfig(preset="tiny", init="random", tokenizer_dir=str(bpe_dir), max_tokens=48),
        TrainConfig(epochs=2, lr=1e-3, device="cpu"),
        out=str(tmp_path / "ckpt"),
    )
    checkpoint, reference = load_checkpoint(finetune(config)), load_checkpoint(trained)
    card = checkpoint.card
    ran = replace(config, train=replace(config.train, precision="float32"))  # what auto is on a CPU
    assert training_config(checkpoint) == ran and training_config(reference) == replace(ran, out=str(trained))
    assert card.threshold == reference.card.threshold and isinstance(card.threshold, Threshold)
    assert card.metrics == reference.card.metrics


def test_skip_existing_finds_the_same_data_by_another_path(trained, csv_data, bpe_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    monkeypatch.setattr(training.finetune.pipeline, "train", lambda *a: pytest.fail("retrains"))
    monkeypatch.chdir(csv_data.parent)
    argv = finetune_argv(Path(csv_data.name), Path(os.path.relpath(bpe_dir)), out, "--skip-existing")
    assert main(argv) == 0 and "skip" in capsys.readouterr().out


def test_help_groups_the_options_and_shows_no_default_for_required_ones(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert all(f"{title} options:" in text for title in ("data", "base model", "training"))
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    checkpoint_help = capsys.readouterr().out.split("--checkpoint CHECKPOINT")[-1].split("--")[0]
    assert "checkpoint directory written by `finetune`" in checkpoint_help and "default" not in checkpoint_help


def test_finetune_prints_the_labels_and_duplicates_before_training(bpe_dir, tmp_path, monkeypatch, capsys):
    """Labels stripped ('spam ' is 'spam'), exact and near duplicates dropped and counted, all said before the
    first epoch and recorded in the card."""
    rng = random.Random(2)
    rows = [
        (" ".join(rng.sample(SPAM_WORDS if i % 2 else HAM_WORDS, 4)) + f" {i}", "spam " if i % 4 == 1 else "ham")
        for i in range(60)
    ]
    rows = [(text, label.replace("ham", "spam") if i % 2 else label) for i, (text, label) in enumerate(rows)]
    rows += rows[:5] + [(text.upper() + "  ", label) for text, label in rows[10:14]]  # 5 exact, 4 near
    data = tmp_path / "messages.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    said_before_training = []
    real_train = training.finetune.pipeline.train

    def train(*args, **kwargs):
        said_before_training.append(capsys.readouterr().out)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training.finetune.pipeline, "train", train)
    assert main(finetune_argv(data, bpe_dir, tmp_path / "out", "--epochs", "1")) == 0
    assert (
        "data " + str(data) + ": 69 rows, 2 labels ('ham' 35, 'spam' 34); dropped 5 exact and 4 near duplicates; "
        "train 42 ('ham' 21, 'spam' 21); validation 6 ('ham' 3, 'spam' 3); test 12 ('ham' 6, 'spam' 6); "
        "selection 6 ('ham' 3, 'spam' 3); evaluation 12 ('ham' 6, 'spam' 6)"
    ) in said_before_training[0]
    card = load_checkpoint(tmp_path / "out").card
    assert card.labels == ("ham", "spam")
    assert card.data.duplicates_dropped == {"exact": 5, "near": 4}


def test_a_checkpoint_of_other_arguments_is_replaced_only_when_told(
    trained, csv_data, bpe_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = (out / "model.safetensors").read_bytes()
    real_train = training.finetune.pipeline.train
    monkeypatch.setattr(training.finetune.pipeline, "train", lambda *a, **k: pytest.fail("trains"))
    assert main(finetune_argv(csv_data, bpe_dir, out, "--seed", "7")) == 1
    err = capsys.readouterr().err
    assert f"{out} was trained with other arguments (seed): --seed 123 -> 7" in err
    assert "pass --overwrite to replace it, or another --out" in err
    other_data = write_messages_csv(tmp_path / "other.csv", seed=1)
    assert main(finetune_argv(other_data, bpe_dir, out)) == 1
    assert "was trained on other data (sha256 " in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(training.finetune.pipeline, "train", real_train)
    assert main(finetune_argv(csv_data, bpe_dir, out, "--seed", "7", "--overwrite")) == 0
    assert load_checkpoint(out).card.training["seed"] == 7


def test_the_python_api_refuses_to_replace_a_checkpoint_of_other_arguments(trained, csv_data, bpe_dir):
    """The README's example run with its default --out, where ./run.sh's checkpoint lies: refused, not replaced."""
    config = FinetuneConfig(
        DataConfig(str(csv_data)),
        BaseModelConfig(preset="tiny", init="random", tokenizer_dir=str(bpe_dir), max_tokens=48),
        TrainConfig(epochs=1, lr=1e-3, device="cpu"),
        out=str(trained),
    )
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(ReplaceRefused, match=r"other arguments \(epochs\): epochs 2 -> 1"):
        finetune(config)
    assert (trained / "model.safetensors").read_bytes() == before


def test_a_rerun_with_the_same_arguments_and_data_replaces_the_checkpoint(trained, csv_data, bpe_dir, tmp_path):
    """It trains the same model again, so nothing is lost; --skip-existing is the way to keep it instead."""
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    (out / "report" / "marker").write_text("")
    assert main(finetune_argv(csv_data, bpe_dir, out)) == 0
    assert not (out / "report" / "marker").exists()
    assert load_checkpoint(out).card.metrics == load_checkpoint(trained).card.metrics


def test_an_interrupted_runs_state_is_kept_unless_told(csv_data, bpe_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    state = state_dir(out)
    state.mkdir()
    (state / "state.json").write_text("{}")
    monkeypatch.setattr(training.finetune.pipeline, "train", lambda *a, **k: pytest.fail("trains"))
    assert main(finetune_argv(csv_data, bpe_dir, out)) == 1
    err = capsys.readouterr().err
    assert f"{state} holds the state of an interrupted run writing {out}" in err
    assert "pass --resume to continue it, or --overwrite to start over and discard it" in err
    assert (state / "state.json").read_text() == "{}"
    monkeypatch.undo()
    assert main(finetune_argv(csv_data, bpe_dir, out, "--overwrite")) == 0
    assert load_checkpoint(out).card.training["epochs"] == 2 and not state.exists()


def test_run_sh_resumes_an_interrupted_run(csv_data, bpe_dir, tmp_path, monkeypatch, capsys):
    """run.sh trains with --skip-existing --resume: after a crash, running it again continues the saved epochs."""
    assert 'spamgpt train --out "$SPAMGPT_CHECKPOINT_DIR" --skip-existing --resume' in (ROOT / "run.sh").read_text()
    out = tmp_path / "out"
    real_write_report = training.finetune.pipeline.write_report

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(training.finetune.pipeline, "write_report", crash)
    assert main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing", "--resume")) == 1
    assert (state_dir(out) / "state.json").is_file()
    monkeypatch.setattr(training.finetune.pipeline, "write_report", real_write_report)
    assert main(finetune_argv(csv_data, bpe_dir, out, "--skip-existing", "--resume")) == 0
    assert f"resuming after epoch 2 from {state_dir(out)}" in capsys.readouterr().out
    assert load_checkpoint(out).card.training["epochs"] == 2 and not state_dir(out).exists()


def test_a_small_separable_csv_keeps_probabilities_informative_and_warns(bpe_dir, tmp_path, capsys):
    """240 rows that every model separates: the temperature used to collapse (served probabilities exactly 0 or 1,
    threshold 1.0); 12 selection ham cannot show a 1% false-positive rate, which the last line and the card say."""
    data = write_messages_csv(tmp_path / "small.csv", n=240)
    out = tmp_path / "ckpt"
    assert main(finetune_argv(data, bpe_dir, out, "--epochs", "6", "--trainable", "all")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "; warning: too few selection rows for --target-fpr 0.01: 12 'ham' rows" in last
    checkpoint = load_checkpoint(out)
    assert checkpoint.card.metrics["warning"].startswith("too few selection rows")
    assert checkpoint.card.calibration.temperature > 1 and checkpoint.card.threshold.value < 1
    texts = ["hi", "hello there", "see you at lunch", "win cash now", *(" ".join(SPAM_WORDS + HAM_WORDS),)]
    rows, _ = encode_batch(checkpoint.tokenizer, texts, 48)
    served = probabilities(predict_logits(checkpoint.model, rows, 8))
    assert ((served > 0) & (served < 1)).all(), served


def test_a_field_over_csvs_limit_is_refused_naming_the_file_and_line(bpe_dir, tmp_path, capsys):
    """A 1 MB field used to end finetune in `_csv.Error: field larger than field limit (131072)`, naming nothing."""
    data = write_messages_csv(tmp_path / "big.csv")
    with open(data, "a", newline="") as f:
        csv.writer(f).writerow(["x" * 1_000_000, "spam"])
    assert main(finetune_argv(data, bpe_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert f"error: {data}, line 62: not a CSV record this reader takes (field larger than field limit" in err
    assert not (tmp_path / "out").exists()
