import json
import os
import shutil

import pytest
import torch

from tests.helpers import DELETE, edit_card, edit_tensors, flip_header_byte, plant_pickle, tiny_card, truncate
from training.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.runtime.inference import Threshold, predict_probabilities
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.tokenizer import BPE_FILES, PACKAGED_BPE_DIR, bpe_hashes, encode_batch

TEXTS = ["WINNER!! Claim your free prize now", "See you at 5?", "", "the cat sat on the mat " * 10]


def test_export_then_load_gives_identical_state_and_probabilities(tmp_path, tiny_config, bpe_dir, tokenizer):
    torch.manual_seed(3)
    model = GPTClassifier(tiny_config).eval()
    card = tiny_card(threshold=Threshold("spam", 0.7), metrics={"test": {"accuracy": 0.5}})
    save_checkpoint(tmp_path / "ckpt", model, bpe_dir, card)

    ckpt = load_checkpoint(tmp_path / "ckpt")
    loaded = ckpt.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert not ckpt.model.training and not any(p.requires_grad for p in ckpt.model.parameters())
    rows, _ = encode_batch(tokenizer, TEXTS, card.max_tokens)
    assert torch.equal(predict_probabilities(ckpt.model, rows), predict_probabilities(model, rows))
    assert (ckpt.card.labels, ckpt.card.max_tokens, ckpt.card.threshold) == (
        ("ham", "spam"),
        48,
        Threshold("spam", 0.7),
    )
    assert ckpt.card.metrics == card.metrics and ckpt.model.config == tiny_config
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["threshold"] == {"label": "spam", "value": 0.7} and written["training"] == written["data"] == {}


def test_load_onto_a_lower_precision_dtype(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.bfloat16}


# --- Broken checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        pytest.param(lambda c: c.rename(c.with_name("moved")), r"ckpt: checkpoint directory not found", id="no-dir"),
        pytest.param(lambda c: shutil.rmtree(c) or c.write_text("text,label\n"), r"ckpt: not a directory", id="a-file"),
        pytest.param(lambda c: (c / "config.json").unlink(), r"config\.json: missing$", id="no-config"),
        pytest.param(
            lambda c: (c / "config.json").unlink() or os.mkfifo(c / "config.json"),
            r"config\.json: not a regular file$",
            id="config-fifo",
        ),
        pytest.param(
            lambda c: (c / "config.json").write_text("{not json"), r"config\.json: not valid JSON", id="config-not-json"
        ),
        pytest.param(
            lambda c: (c / "config.json").write_text("[1, 2]"),
            r"config\.json: expected a JSON object, got list",
            id="config-not-object",
        ),
        pytest.param(edit_card(labels=DELETE), r"config\.json: missing field 'labels'", id="missing-field"),
        pytest.param(
            edit_card(format_version=3),
            r"config\.json: unknown format_version 3 \(this spamgpt reads 2\)",
            id="format-version",
        ),
        pytest.param(
            edit_card(format_version=DELETE), r"config\.json: missing field 'format_version'", id="no-format-version"
        ),
        pytest.param(edit_card(calibration=DELETE), r"config\.json: missing field 'calibration'", id="no-calibration"),
        pytest.param(
            edit_card(model={"n_layer": 2, "n_head": 3, "n_embd": 32}),
            r"config\.json: invalid model config \(n_embd 32 is not divisible by n_head 3\)",
            id="bad-model-config",
        ),
        pytest.param(
            edit_card(model={"n_layers": 2}),
            r"config\.json: invalid model config \(.*unexpected keyword argument 'n_layers'",
            id="unknown-model-field",
        ),
        pytest.param(
            edit_card(labels=["ham"]), r"'labels' must be 2 distinct non-empty strings, got \['ham'\]", id="one-label"
        ),
        pytest.param(edit_card(labels=["ham", "ham"]), r"'labels' must be .*got \['ham', 'ham'\]", id="repeated-label"),
        pytest.param(edit_card(labels=["ham", 1]), r"'labels' must be .*got \['ham', 1\]", id="int-label"),
        pytest.param(edit_card(labels="ham,spam"), r"'labels' must be .*got 'ham,spam'", id="labels-string"),
        pytest.param(edit_card(max_tokens=0), r"'max_tokens' must be an integer in 1\.\.64, got 0", id="max-tokens-0"),
        pytest.param(edit_card(max_tokens=65), r"'max_tokens' must be .*got 65", id="max-tokens-over-block"),
        pytest.param(edit_card(max_tokens="48"), r"'max_tokens' must be .*got '48'", id="max-tokens-string"),
        pytest.param(edit_card(max_tokens=True), r"'max_tokens' must be .*got True", id="max-tokens-bool"),
        pytest.param(edit_card(pooling="mean"), r"config\.json: unknown pooling 'mean'", id="pooling"),
        pytest.param(
            edit_card(threshold={"label": "eggs", "value": 0.5}),
            r"'threshold' must be null or .*'eggs'",
            id="threshold-label",
        ),
        pytest.param(
            edit_card(threshold={"label": "spam", "value": 1.5}),
            r"'threshold' must be null or .*1\.5",
            id="threshold-over-1",
        ),
        pytest.param(
            edit_card(threshold={"label": "spam", "value": True}),
            r"'threshold' must be null or .*True",
            id="threshold-bool",
        ),
        pytest.param(edit_card(threshold=0.5), r"'threshold' must be null or .*got 0\.5", id="threshold-number"),
        pytest.param(
            edit_card(threshold={"label": "spam"}), r"'threshold' must be null or .*got \{'label'", id="no-value"
        ),
        pytest.param(
            edit_card(tokenizer={"sha256": ["vocab.bpe", "encoder.json"]}),
            r"'tokenizer' must record the sha256",
            id="tokenizer-hashes-list",
        ),
        pytest.param(edit_card(created=5), r"'created' must be a string or null, got 5", id="created-int"),
        pytest.param(edit_card(version=[1]), r"'version' must be a string or null, got \[1\]", id="version-list"),
        pytest.param(edit_card(base_model=None), r"'base_model' must be a non-empty string, got None", id="base-none"),
        pytest.param(edit_card(format_version=True), r"unknown format_version True", id="format-version-bool"),
        pytest.param(
            edit_card(tokenizer={"name": "gpt2"}),
            r"'tokenizer' must record the sha256 of \['vocab\.bpe'",
            id="tokenizer-field",
        ),
        pytest.param(lambda c: (c / "model.safetensors").unlink(), r"model\.safetensors: missing$", id="no-weights"),
        pytest.param(
            lambda c: (c / "model.safetensors").unlink() or (c / "model.safetensors").mkdir(),
            r"model\.safetensors: not a regular file$",
            id="weights-a-directory",
        ),
        pytest.param(
            lambda c: (c / "tokenizer" / "vocab.bpe").unlink() or os.mkfifo(c / "tokenizer" / "vocab.bpe"),
            r"vocab\.bpe: tokenizer file not a regular file$",
            id="tokenizer-fifo",
        ),
        pytest.param(truncate, r"model\.safetensors: not a readable safetensors file", id="truncated"),
        pytest.param(flip_header_byte, r"model\.safetensors: not a readable safetensors file", id="header-byte"),
        pytest.param(plant_pickle, r"model\.safetensors: not a readable safetensors file", id="pickle"),
        pytest.param(
            edit_tensors(lambda s: s.pop("score.bias")),
            r"model\.safetensors: missing tensor 'score\.bias' \(1 missing in all\)",
            id="missing-tensor",
        ),
        pytest.param(
            edit_tensors(lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"].clone()})),
            r"model\.safetensors: unexpected tensor 'lm_head\.weight'",
            id="extra-tensor",
        ),
        pytest.param(
            edit_tensors(lambda s: s.update({"score.weight": torch.zeros(3, 32)})),
            r"model\.safetensors: tensor 'score\.weight' has shape \(3, 32\), config needs \(2, 32\)",
            id="wrong-shape",
        ),
        pytest.param(
            edit_tensors(lambda s: s["transformer.h.1.mlp.c_fc.bias"].__setitem__(5, float("nan"))),
            r"tensor 'transformer\.h\.1\.mlp\.c_fc\.bias' has non-finite values",
            id="nan",
        ),
        pytest.param(
            edit_tensors(lambda s: s.update({"score.bias": torch.zeros(2, dtype=torch.int64)})),
            r"tensor 'score\.bias' has dtype torch\.int64, expected floating point",
            id="int-tensor",
        ),
        pytest.param(
            lambda c: (c / "tokenizer" / "vocab.bpe").unlink(), r"vocab\.bpe: tokenizer file missing", id="no-tokenizer"
        ),
        pytest.param(
            lambda c: (c / "tokenizer" / "encoder.json").write_text("{}"),
            r"tokenizer[/\\]encoder\.json: sha256 [0-9a-f]{64} does not match expected [0-9a-f]{64}",
            id="tokenizer-hash",
        ),
    ],
)
def test_load_checkpoint_refuses(tiny_checkpoint, breakage, match):
    breakage(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tiny_checkpoint)
    assert not (tiny_checkpoint.parent / "pickle-ran").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_by_save_and_by_load(tmp_path, tiny_config, bpe_dir):
    small = GPTClassifier(GPTConfig.from_preset("tiny", vocab_size=tiny_config.vocab_size - 1))
    larger = rf"tokenizer has {tiny_config.vocab_size} tokens, model vocab_size {tiny_config.vocab_size - 1}"
    with pytest.raises(CheckpointError, match=larger):
        save_checkpoint(tmp_path / "small", small, bpe_dir, tiny_card())
    assert not (tmp_path / "small").exists()
    # a checkpoint whose tokenizer was swapped afterwards for GPT-2's own 50,257 tokens, its hashes updated to match
    checkpoint = save_checkpoint(tmp_path / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card())
    for name in BPE_FILES:
        shutil.copyfile(PACKAGED_BPE_DIR / name, checkpoint / "tokenizer" / name)
    config = json.loads((checkpoint / "config.json").read_text())
    config["tokenizer"]["sha256"] = bpe_hashes(checkpoint / "tokenizer")
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"has 50257 tokens, model vocab_size {tiny_config.vocab_size}"):
        load_checkpoint(checkpoint)


def test_save_checkpoint_refuses_a_card_the_loader_would_refuse_and_writes_nothing(tmp_path, tiny_config, bpe_dir):
    """max_tokens past the model's block_size (64 for the tiny preset) would make a checkpoint no server loads: it is
    refused before a file is written, naming the field."""
    with pytest.raises(CheckpointError, match=r"'max_tokens' must be an integer in 1\.\.64, got 256"):
        save_checkpoint(tmp_path / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card(max_tokens=256))
    assert not (tmp_path / "ckpt").exists()


def test_refuses_a_config_json_in_the_format_written_by_spamgpt_0_1_0(tiny_checkpoint):
    """config.json exactly as `finetune` wrote it in format 1: refused in one line that names the file, the version
    found and the command that writes the current format."""
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    training = {
        "trainable": "last-blocks", "trainable_blocks": 1, "lora_rank": 8, "lora_alpha": 16.0, "epochs": 5,
        "batch_size": 8, "lr": 5e-05, "weight_decay": 0.1, "seed": 123, "device": "auto", "cache_prefix": True,
        "data": "sms", "text_column": "text", "label_column": "label", "balance": True, "preset": "gpt2",
        "init": "random", "weights": None, "tokenizer_dir": None, "max_tokens": 48,
        "cache_dir": "/cache", "out": "/models/spamgpt", "skip_existing": True,
    }  # fmt: skip
    data = {
        "source": "sms",
        "fingerprint": {"sha256": "ab" * 32, "rows": 5574, "labels": {"ham": 4827, "spam": 747}},
        "rows_after_dedup_and_balance": 1306,
        "split": {"train": 914, "validation": 130, "test": 262},
    }
    metrics = {"test_accuracy": 0.95, "test_f1": 0.95, "test_roc_auc": 0.99, "f1_label": "spam", "best_epoch": 4}
    del raw["calibration"]
    raw |= {
        "format_version": 1,
        "threshold": {"label": "spam", "value": 0.41},
        "base_model": "gpt2 (random init)",
        "metrics": metrics,
        "training": training,
        "data": data,
        "created": "2026-11-20T10:00:00+00:00",
        "version": "0.1.0",
    }
    (tiny_checkpoint / "config.json").write_text(json.dumps(raw, indent=2))

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tiny_checkpoint)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"{tiny_checkpoint / 'config.json'}: format_version 1 is no longer read (this spamgpt reads 2); retrain it "
        f"with `spamgpt train --out {tiny_checkpoint}` and the options recorded under 'training' in config.json"
    )


@pytest.mark.parametrize(
    ("field", "record", "match"),
    [
        pytest.param("training", [], r"'training' must be an object, got \[\]", id="list"),
        pytest.param("data", {"source": "sms"}, r"invalid 'data' record \(.*fingerprint", id="data-missing-field"),
        pytest.param("data", {"source": 3}, r"'data' record \(source must be str, got 3\)", id="data-source-int"),
        pytest.param("metrics", [1], r"'metrics' must be an object, got \[1\]", id="metrics-list"),
        pytest.param("calibration", {"temperature": 1.0}, r"'calibration' must be null or", id="calibration-fields"),
        pytest.param(
            "calibration",
            {"temperature": 0, "training_prior": {"ham": 0.5, "spam": 0.5}, "prior": {"ham": 0.5, "spam": 0.5}},
            r"'calibration' temperature must be a positive number, got 0",
            id="temperature-0",
        ),
        pytest.param(
            "calibration",
            {"temperature": 1.0, "training_prior": {"ham": 0.5, "spam": 0.5}, "prior": {"ham": 0.9, "spam": 0.2}},
            r"'calibration' prior: a prior must give each of \['ham', 'spam'\] a rate in \(0, 1\), summing to 1",
            id="prior-sum",
        ),
        pytest.param(
            "calibration",
            {"temperature": 1.0, "training_prior": {"spam": 1.0}, "prior": {"ham": 0.5, "spam": 0.5}},
            r"'calibration' training_prior: a prior must give each of",
            id="training-prior-labels",
        ),
    ],
)
def test_load_checkpoint_refuses_a_bad_record(tiny_checkpoint, field, record, match):
    edit_card(**{field: record})(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tiny_checkpoint)
