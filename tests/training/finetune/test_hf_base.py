"""Any GPT-2-family base: sizes from its config.json, weights unsharded or sharded, checked against transformers'
GPT2Model; other architectures refused by name; a repo id resolved through the Hugging Face cache."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.helpers import write_messages_csv
from training.cli import main
from training.finetune.base import (
    UnsupportedBase,
    base_classifier,
    base_config,
    pretrained_classifier,
    resolve_base,
    weights_file,
)
from training.runtime.checkpoint import load_checkpoint
from training.runtime.model import GPTConfig, Packing, WeightsError

# Sizes no preset has: 3 layers, 4 heads, width 64, 128 positions
ODD = dict(n_layer=3, n_head=4, n_embd=64, n_positions=128)


def save_random_gpt2(directory: Path, vocab_size: int, shard: bool, **sizes) -> "torch.nn.Module":
    """A transformers GPT2Model with random weights everywhere (biases and norms too), saved with save_pretrained."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **sizes)
    torch.manual_seed(3)
    model = transformers.GPT2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln_" in name and name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "10GB")
    return model


@pytest.mark.parametrize("shard", [pytest.param(False, id="unsharded"), pytest.param(True, id="sharded")])
def test_a_base_of_unusual_size_matches_transformers_hidden_states(tmp_path, tokenizer, shard):
    hf = save_random_gpt2(tmp_path / "base", tokenizer.n_vocab, shard, **ODD)
    files = {p.name for p in (tmp_path / "base").iterdir()}
    assert ("model.safetensors.index.json" in files) == shard and ("model.safetensors" in files) != shard
    assert (len([name for name in files if name.endswith(".safetensors")]) > 1) == shard
    model = base_classifier(str(tmp_path / "base"), n_labels=3, vocab_size=tokenizer.n_vocab).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.n_labels) == (3, 4, 64, 128, 3)
    assert c.vocab_size == tokenizer.n_vocab
    idx = torch.randint(0, tokenizer.n_vocab, (3, 128), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([128, 5, 77])
    with torch.no_grad():
        ours = model.transformer.ln_f(model.prefix(idx, Packing(lengths, "cpu"), c.n_layer))  # (N, C)
        theirs = torch.cat([hf(idx[i : i + 1, :n]).last_hidden_state[0] for i, n in enumerate(lengths.tolist())])
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_random_init_from_a_base_takes_only_its_sizes(tmp_path, tokenizer):
    save_random_gpt2(tmp_path / "base", tokenizer.n_vocab, False, **ODD)
    (tmp_path / "base" / "model.safetensors").unlink()  # random init needs no weights
    model = base_classifier(str(tmp_path / "base"), n_labels=2, vocab_size=tokenizer.n_vocab, pretrained=False)
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (3, 64, 128)


def write_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "config, match",
    [
        pytest.param(
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            r"not a GPT-2-family model: model_type 'llama', architectures \['LlamaForCausalLM'\]",
            id="llama",
        ),
        pytest.param({"architectures": ["BertModel"]}, r"model_type None, architectures \['BertModel'\]", id="none"),
        pytest.param({"model_type": "gpt2", "activation_function": "relu"}, r"activation_function 'relu'", id="relu"),
        pytest.param({"model_type": "gpt2", "n_embd": 64, "n_inner": 100}, r"n_inner 100 is not supported", id="inner"),
        pytest.param(
            {"model_type": "gpt2", "vocab_size": 100}, r"vocab_size 100 is smaller than the tokenizer", id="vocab"
        ),
        pytest.param(
            {"model_type": "gpt2", "n_embd": 30, "n_head": 4}, r"n_embd 30 is not divisible by n_head 4", id="heads"
        ),
    ],
)
def test_configs_we_cannot_compute_are_refused_naming_what_was_found(tmp_path, tokenizer, config, match):
    """UnsupportedBase, not a failure to get weights: no --init choice helps, and the CLI says so (exit 2)."""
    with pytest.raises(UnsupportedBase, match=match):
        base_config(write_config(tmp_path / "base", **config), n_labels=2, vocab_size=tokenizer.n_vocab)


def test_a_base_config_that_is_missing_or_not_a_file_is_named_as_such(tmp_path, tokenizer):
    with pytest.raises(WeightsError, match=r"base/config\.json: missing; a base model directory needs"):
        base_config(tmp_path / "base", n_labels=2, vocab_size=tokenizer.n_vocab)
    (tmp_path / "base" / "config.json").mkdir(parents=True)
    with pytest.raises(WeightsError, match=r"base/config\.json: not a regular file; a base model directory needs"):
        base_config(tmp_path / "base", n_labels=2, vocab_size=tokenizer.n_vocab)


def test_missing_weights_and_missing_shards_are_named(tmp_path, tokenizer):
    base = write_config(tmp_path / "base", model_type="gpt2", vocab_size=tokenizer.n_vocab, **ODD)
    with pytest.raises(WeightsError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        base_classifier(str(base), n_labels=2, vocab_size=tokenizer.n_vocab)
    (base / "model.safetensors").mkdir()
    with pytest.raises(WeightsError, match=r"base[/\\]model\.safetensors: not a regular file$"):
        base_classifier(str(base), n_labels=2, vocab_size=tokenizer.n_vocab)
    (base / "model.safetensors").rmdir()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"h.0.ln_1.weight": "shard-1.safetensors"}})
    )
    with pytest.raises(WeightsError, match=r"shard-1\.safetensors: missing$"):
        base_classifier(str(base), n_labels=2, vocab_size=tokenizer.n_vocab)
    (base / "shard-1.safetensors").mkdir()  # as a FIFO would be, which opening would wait on
    with pytest.raises(WeightsError, match=r"shard-1\.safetensors: not a regular file$"):
        base_classifier(str(base), n_labels=2, vocab_size=tokenizer.n_vocab)
    (base / "shard-1.safetensors").rmdir()
    (base / "shard-1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match=r"shard-1\.safetensors: not a readable safetensors file"):
        base_classifier(str(base), n_labels=2, vocab_size=tokenizer.n_vocab)


def test_a_repo_id_or_alias_is_fetched_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_base("distilgpt2") == tmp_path
    assert resolve_base("someone/my-gpt2", weights=False) == tmp_path
    assert asked == [
        ("distilbert/distilgpt2", ["config.json", "*.safetensors", "model.safetensors.index.json"]),
        ("someone/my-gpt2", ["config.json"]),
    ]


def test_a_failed_download_is_a_weights_error_naming_the_repo(monkeypatch):
    import huggingface_hub

    def offline(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match=r"could not get 'openai-community/gpt2-medium' .*: offline"):
        resolve_base("gpt2-medium")


def test_finetune_from_a_local_base_directory(tmp_path, tokenizer, bpe_dir, capsys):
    save_random_gpt2(tmp_path / "base", tokenizer.n_vocab, True, **ODD)
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = ["finetune", "--base", str(tmp_path / "base"), "--data", str(data), "--tokenizer-dir", str(bpe_dir)]
    argv += ["--epochs", "1", "--max-tokens", "32", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "ckpt")]) == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    c = checkpoint.model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (3, 4, 64, 128)
    assert checkpoint.card.base_model == str(tmp_path / "base") and checkpoint.card.training["base"] == str(
        tmp_path / "base"
    )
    # the frozen blocks still hold the base's weights
    hf_first = base_classifier(str(tmp_path / "base"), 2, tokenizer.n_vocab).transformer.h[0].attn.c_attn.weight
    assert torch.equal(checkpoint.model.transformer.h[0].attn.c_attn.weight, hf_first)
    assert main([*argv[:-2], "--max-tokens", "129", "--out", str(tmp_path / "other")]) == 1
    assert "--max-tokens must lie in 1..128 for --base" in capsys.readouterr().err
    unread = [*argv[:-2], "--max-tokens", "129", "--data", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o")]
    assert main(unread) == 1  # refused before the data is read: no complaint about the missing file
    assert "--max-tokens must lie in 1..128 for --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--weights", "w.safetensors", "--out", str(tmp_path / "x")])
    assert "give one" in capsys.readouterr().err


# --- OpenAI's weights for a preset: a local file, or the preset's repo through the same fetcher ---------------


def test_pretrained_classifier_refuses_a_file_that_is_not_safetensors(tmp_path, tiny_config):
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x02 not safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable safetensors file"):
        pretrained_classifier(tiny_config, "gpt2", source=tmp_path)


def test_local_weights_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert weights_file(tmp_path) == tmp_path / "model.safetensors"
    assert weights_file(tmp_path / "model.safetensors") == tmp_path / "model.safetensors"
    with pytest.raises(WeightsError, match=r"no GPT-2 weights at .*elsewhere: missing$"):
        weights_file(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"no GPT-2 weights at .*empty[/\\]model\.safetensors: missing$"):
        weights_file(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").mkdir()  # as a FIFO would be, which opening would wait on
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a regular file$"):
        weights_file(tmp_path / "empty")


def test_a_presets_weights_come_through_the_hub_and_a_failed_download_names_the_repo(monkeypatch, tiny_config):
    import huggingface_hub

    calls = []

    def offline(repo_id, allow_patterns):
        calls.append(repo_id)
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match=r"could not get 'openai-community/gpt2-medium' .*: network is unreachable"):
        pretrained_classifier(tiny_config, "gpt2-medium")
    assert calls == ["openai-community/gpt2-medium"]


def test_a_preset_without_pretrained_weights_is_refused_without_a_download(monkeypatch, tiny_config):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", pytest.fail)  # must not be reached
    with pytest.raises(WeightsError, match=r"preset 'tiny' has no pretrained weights"):
        pretrained_classifier(GPTConfig.from_preset("tiny"), "tiny")


def test_a_config_with_several_unsupported_options_names_them_all_and_what_works(tmp_path, tokenizer, bpe_dir, capsys):
    config = {"model_type": "gpt2", "activation_function": "relu", "scale_attn_weights": False, "n_inner": 100}
    base = write_config(tmp_path / "base", **config)
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = ["finetune", "--base", str(base), "--data", str(data), "--tokenizer-dir", str(bpe_dir), "--device", "cpu"]
    assert main([*argv, "--init", "random", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "activation_function 'relu'" in err and "scale_attn_weights False" in err and "n_inner 100" in err
    assert "--preset with --init random --trainable all" in err and "Ways out" not in err


def test_a_base_vocabulary_smaller_than_the_tokenizer_is_not_a_weights_problem(tmp_path, tokenizer, bpe_dir, capsys):
    """With --init random no weights are fetched: the refusal says the base cannot be used, not how to get weights."""
    small = tokenizer.n_vocab - 1
    base = write_config(tmp_path / "base", model_type="gpt2", vocab_size=small, n_positions=32, n_embd=32, n_head=2)
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = ["finetune", "--base", str(base), "--data", str(data), "--tokenizer-dir", str(bpe_dir), "--device", "cpu"]
    assert main([*argv, "--init", "random", "--trainable", "all", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the base model is not supported: ")
    assert f"vocab_size {small} is smaller than the tokenizer's {tokenizer.n_vocab}" in err and "Ways out" not in err


def test_an_unreachable_hub_fails_at_once_naming_the_whole_way_out(tmp_path, bpe_dir, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = ["finetune", "--data", str(data), "--tokenizer-dir", str(bpe_dir), "--out", str(tmp_path / "ckpt")]
    started = time.monotonic()
    assert main(argv) == 2  # the endpoint is a closed loopback port (conftest)
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "'openai-community/gpt2'" in err and "http://127.0.0.1:9 did not answer" in err
    assert "--init random --trainable all" in err and "SPAMGPT_INIT=random SPAMGPT_TRAINABLE=all" in err
    assert constants.HF_HUB_OFFLINE is False  # offline mode lasted only for the one download


def test_a_hub_that_does_not_answer_in_time_is_not_retried(tmp_path, monkeypatch):
    import huggingface_hub

    def silent(address, timeout):
        raise TimeoutError("timed out")

    asked = []
    monkeypatch.setattr(socket, "create_connection", silent)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(offline()) or str(tmp_path))
    assert resolve_base("gpt2") == tmp_path and asked == [True]  # the cache alone served


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def test_random_weights_with_frozen_blocks_warn_and_max_tokens_follows_the_model(tmp_path, bpe_dir, capsys):
    data = write_messages_csv(tmp_path / "messages.csv", n=40)
    argv = ["finetune", "--preset", "tiny", "--init", "random", "--data", str(data), "--tokenizer-dir", str(bpe_dir)]
    assert main([*argv, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "ckpt")]) == 0
    captured = capsys.readouterr()
    assert "warning: --init random with --trainable last-blocks keeps random blocks frozen" in captured.err
    card = load_checkpoint(tmp_path / "ckpt").card
    assert card.max_tokens == 64 and card.training["max_tokens"] is None  # min(256, tiny's 64 positions)
    for phase in ("calibration: validation, evaluation", "threshold and metrics: selection, test, evaluation"):
        assert phase in captured.err and "row/s" in captured.err, phase
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--device", "cpu"]) == 0
    assert "scoring: 100%" in capsys.readouterr().err


def test_a_preset_without_weights_and_init_pretrained_is_refused_naming_what_works(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--preset", "tiny", "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert "preset 'tiny' has no pretrained weights: add --init random --trainable all" in err
