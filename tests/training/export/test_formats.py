"""Exports of a checkpoint: the Hugging Face layout gives our probabilities in transformers' own pipeline, the
ONNX folder gives them in ONNX Runtime (fed by transformers' or the tokenizers library's tokenizer from the folder,
padded on either side) and in Optimum, on mixed-length batches; tokenizer.json gives our token ids."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import readme_python, tiny_card
from training.cli import main
from training.export.formats import (
    ONNX_OPSET,
    export_hf,
    export_onnx,
    fold_score_bias,
    model_card_readme,
    onnx_inputs,
)
from training.finetune.data import load_sms_spam
from training.runtime.checkpoint import DataSummary, load_checkpoint, save_checkpoint
from training.runtime.inference import Threshold, pad_right, predict_probabilities
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.tokenizer import ENDOFTEXT, PACKAGED_BPE_DIR, encode_batch, load_tokenizer

# Mixed lengths; a trailing "!" is token 0 (a tempting pad id), and "<|endoftext|>" inside a text is plain text,
# so neither may be read as padding.
TEXTS = [
    "WINNER!! Claim your free prize now",
    "See you at 5?",
    "ok",
    f"the end {ENDOFTEXT}",
    ENDOFTEXT,
    "Call me when you get there, or text if the train is late again tonight!",
    "!",
    "free entry in 2 a wkly comp to win fa cup final tkts 21st may 2005",
]


def sharp_checkpoint(directory: Path, bpe_dir: Path, config: GPTConfig) -> Path:
    """A random classifier whose head is large and biased, so its probabilities vary from text to text and the
    bias moves them: an export that dropped or misplaced the bias would be far off."""
    torch.manual_seed(1)
    model = GPTClassifier(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 2.0)
        model.score.bias.copy_(torch.tensor([2.5, -1.5]))
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0.0, 0.5)
    card = tiny_card(threshold=Threshold("spam", 0.7), metrics={"test_accuracy": 0.9542, "test_roc_auc": 0.992})
    return save_checkpoint(directory, model, bpe_dir, card)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe_dir, tiny_config) -> Path:
    return sharp_checkpoint(tmp_path_factory.mktemp("sharp") / "ckpt", bpe_dir, tiny_config)


@pytest.fixture(scope="module")
def real_vocab_checkpoint(tmp_path_factory) -> Path:
    """The sharp random classifier on GPT-2's real vocabulary (the packaged BPE files), 256 positions."""
    config = GPTConfig.from_preset("tiny", vocab_size=load_tokenizer(PACKAGED_BPE_DIR).n_vocab, block_size=256)
    return sharp_checkpoint(tmp_path_factory.mktemp("real") / "ckpt", PACKAGED_BPE_DIR, config)


# "<|endoftext|>" as plain text where a tokenizer might split it out as a special token
ENDOFTEXT_TEXTS = [
    ENDOFTEXT,
    f"a{ENDOFTEXT}b",
    f" {ENDOFTEXT} ",
    ENDOFTEXT * 3,
    f"<|endoftext|{ENDOFTEXT}|>",
    f"WINNER!! {ENDOFTEXT}\nClaim now",
]


def our_probabilities(checkpoint_dir: Path, texts: list[str]) -> torch.Tensor:
    loaded = load_checkpoint(checkpoint_dir)
    rows, _ = encode_batch(loaded.tokenizer, texts, loaded.card.max_tokens)
    return predict_probabilities(loaded.model, rows)


def pipeline_probabilities(hf_dir: Path, texts: list[str], batch_size: int, labels: tuple[str, ...]) -> torch.Tensor:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(hf_dir), top_k=None, batch_size=batch_size, device="cpu")
    answers = classify(texts, truncation=True)
    return torch.tensor([[{a["label"]: a["score"] for a in answer}[label] for label in labels] for answer in answers])


# --- The score bias, folded --------------------------------------------------------------------------


def _head_case(n_embd: int, n_labels: int, zero_weight=False, zero_gamma=False):
    g = torch.Generator().manual_seed(n_embd + n_labels)
    gamma = torch.rand(n_embd, generator=g, dtype=torch.float64) + 0.5
    if zero_gamma:
        gamma[3] = 0.0
    beta = torch.randn(n_embd, generator=g, dtype=torch.float64)
    weight = torch.zeros(n_labels, n_embd, dtype=torch.float64)
    if not zero_weight:
        weight.normal_(generator=g)
    bias = torch.randn(n_labels, generator=g, dtype=torch.float64) * 3
    return gamma, beta, weight, bias


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_head_case(32, 2), id="binary"),
        pytest.param(_head_case(48, 5), id="five-labels"),
        pytest.param(_head_case(16, 2, zero_weight=True), id="zero-weight-head"),
        pytest.param(_head_case(32, 3, zero_gamma=True), id="a-zero-gamma"),
    ],
)
def test_folded_bias_gives_the_same_logits_for_any_hidden_state(case):
    gamma, beta, weight, bias = case
    new_beta, new_weight = fold_score_bias(gamma, beta, weight, bias)
    hidden = torch.randn(256, gamma.numel(), dtype=torch.float64) * 10 + 3
    expected = F.layer_norm(hidden, gamma.shape, gamma, beta) @ weight.T + bias
    folded = F.layer_norm(hidden, gamma.shape, gamma, new_beta) @ new_weight.T
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-9)
    assert (expected - F.layer_norm(hidden, gamma.shape, gamma, beta) @ weight.T).abs().max() > 1  # bias mattered


# --- Hugging Face layout -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tmp_path_factory) -> Path:
    return export_hf(checkpoint, tmp_path_factory.mktemp("export") / "hf")


def test_hf_config_labels_padding_and_card(hf_dir, checkpoint):
    loaded = load_checkpoint(checkpoint)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["pad_token_id"] == loaded.tokenizer.eot_token
    sizes = loaded.model.config
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"], config["vocab_size"]) == (
        sizes.n_layer,
        sizes.n_head,
        sizes.n_embd,
        sizes.block_size,
        sizes.vocab_size,
    )
    readme = (hf_dir / "README.md").read_text()
    assert (
        "P(spam) >= 0.7 " in readme and "| test_accuracy | 0.9542 |" in readme and "| test_roc_auc | 0.992 |" in readme
    )
    # the decision rule points back at the pipeline example, which comes first
    assert readme.index('pipeline("text-classification"') < readme.index("the pipeline above reports"), readme


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("sms", "Almeida, José María Gómez Hidalgo and Akebo Yamakami"),
        ("/data/SMSSpamCollection", "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"),
        ("/home/me/tickets.csv", "Fine-tuned on `tickets.csv` (120 rows)."),
        (None, "Not recorded in the checkpoint."),
    ],
)
def test_the_exported_card_credits_its_training_data(checkpoint, source, expected):
    """CC BY 4.0 asks whoever shares a model trained on the SMS Spam Collection to credit its authors."""
    loaded = load_checkpoint(checkpoint)
    fingerprint = {"sha256": "0" * 64, "rows": 120, "labels": {}}
    data = None if source is None else DataSummary(source, fingerprint, 100, {}, {}, {})
    readme = model_card_readme(dataclasses.replace(loaded, card=dataclasses.replace(loaded.card, data=data)))
    assert expected in readme.split("## Training data", 1)[1]


def test_hf_tokenizer_gives_our_token_ids(hf_dir, checkpoint):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(hf_dir)
    ours = load_checkpoint(checkpoint).tokenizer
    texts = [*TEXTS, "x" * 200]
    assert theirs(texts, truncation=True)["input_ids"] == encode_batch(ours, texts, 48)[0]
    assert theirs.pad_token_id == ours.eot_token and theirs.model_max_length == 48


def test_tokenizer_json_gives_our_ids_on_every_sms_text_and_endoftext_as_plain_text(real_vocab_checkpoint, tmp_path):
    """tokenizer.json read by the tokenizers library alone (as TEI reads it), with GPT-2's real vocabulary: the ids
    of encode_ordinary for the whole packaged collection and for texts holding <|endoftext|>."""
    from tokenizers import Tokenizer

    hf = export_hf(real_vocab_checkpoint, tmp_path / "hf")
    theirs = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ours = load_tokenizer(PACKAGED_BPE_DIR)
    texts = [*load_sms_spam().texts, *ENDOFTEXT_TEXTS]
    assert len(texts) > 5000
    theirs.no_truncation()
    theirs.no_padding()
    assert [e.ids for e in theirs.encode_batch(texts)] == [ours.encode_ordinary(t) for t in texts]
    assert theirs.token_to_id(ENDOFTEXT) == ours.eot_token  # in the vocabulary, as config.json's pad_token_id
    assert not any(token.special for token in theirs.get_added_tokens_decoder().values())


def test_tokenizer_json_truncates_and_pads_as_we_do(real_vocab_checkpoint, tmp_path):
    """The truncation and padding stored in tokenizer.json: each row's real ids are encode_batch's, its padding is
    <|endoftext|> on the right with attention_mask 0."""
    from tokenizers import Tokenizer

    hf = export_hf(real_vocab_checkpoint, tmp_path / "hf")
    texts = [*TEXTS, "free entry " * 60, *ENDOFTEXT_TEXTS]
    encodings = Tokenizer.from_file(str(hf / "tokenizer.json")).encode_batch(texts)
    loaded = load_checkpoint(real_vocab_checkpoint)
    rows, truncated = encode_batch(loaded.tokenizer, texts, loaded.card.max_tokens)
    assert any(truncated) and len({len(e.ids) for e in encodings}) == 1
    for encoding, row in zip(encodings, rows, strict=True):
        assert encoding.attention_mask == [1] * len(row) + [0] * (len(encoding.ids) - len(row))
        assert encoding.ids == row + [loaded.tokenizer.eot_token] * (len(encoding.ids) - len(row))


def test_auto_tokenizer_reads_endoftext_as_plain_text(real_vocab_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(export_hf(real_vocab_checkpoint, tmp_path / "hf"))
    ours = load_checkpoint(real_vocab_checkpoint).tokenizer
    assert theirs(ENDOFTEXT_TEXTS, truncation=True)["input_ids"] == encode_batch(ours, ENDOFTEXT_TEXTS, 48)[0]
    assert (theirs.pad_token_id, theirs.eos_token_id) == (ours.eot_token, ours.eot_token)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_hf_pipeline_gives_our_probabilities(hf_dir, checkpoint, batch_size):
    ours = our_probabilities(checkpoint, TEXTS)
    theirs = pipeline_probabilities(hf_dir, TEXTS, batch_size, ("ham", "spam"))
    assert ours[:, 1].max() > 0.9 and ours[:, 1].min() < 0.1  # the texts really are told apart
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_hf_model_loads_every_weight_and_nothing_else(hf_dir):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(hf_dir, output_loading_info=True)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_hf_real_sms_texts_in_mixed_length_batches(shared_data, tmp_path):
    """The real GPT-2 vocabulary and real messages, in input (unsorted) order and batches of 16."""
    bpe = shared_data / "gpt2-bpe"
    config = GPTConfig.from_preset("tiny", vocab_size=load_tokenizer(bpe).n_vocab, block_size=256)
    ckpt = sharp_checkpoint(tmp_path / "ckpt", bpe, config)
    texts = load_sms_spam(shared_data / "sms-spam-collection" / "SMSSpamCollection").texts[:160]
    hf = export_hf(ckpt, tmp_path / "hf")
    torch.testing.assert_close(
        pipeline_probabilities(hf, texts, 16, ("ham", "spam")), our_probabilities(ckpt, texts), rtol=0, atol=1e-5
    )


# --- ONNX ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_dir(checkpoint, tmp_path_factory) -> Path:
    return export_onnx(checkpoint, tmp_path_factory.mktemp("export") / "onnx")


def test_onnx_declares_its_opset_and_dynamic_axes(onnx_dir):
    import onnx

    model = onnx.load(onnx_dir / "model.onnx")
    assert {o.domain: o.version for o in model.opset_import}[""] == ONNX_OPSET
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(isinstance(d, str) and d for shape in dims.values() for d in shape), dims  # symbolic, not fixed
    assert dims["input_ids"] == dims["attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert (onnx_dir / "tokenizer" / "vocab.bpe").is_file() and (onnx_dir / "config.json").is_file()


def test_onnx_runtime_gives_our_probabilities_on_mixed_length_batches(onnx_dir, checkpoint):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(0)
    for batch, longest in ((1, 1), (1, 48), (5, 17), (16, 48)):  # batch shapes the export example never had
        lengths = torch.randint(1, longest + 1, (batch,), generator=g)
        lengths[0] = longest
        rows = [torch.randint(0, loaded.model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        idx, lens = pad_right(rows, pad_id=7)
        logits, probs = session.run(None, onnx_inputs(idx, lens))
        ours = predict_probabilities(loaded.model, rows)
        torch.testing.assert_close(torch.from_numpy(probs), ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(torch.from_numpy(logits), -1))


def test_onnx_folder_is_a_model_directory(onnx_dir, hf_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = json.loads((onnx_dir / "config.json").read_text())
    assert config == json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["max_position_embeddings"]) == ("gpt2", 64)
    loaded = AutoConfig.from_pretrained(onnx_dir)
    assert loaded.architectures == ["GPT2ForSequenceClassification"] and loaded.n_positions == 64
    assert loaded.id2label == {0: "ham", 1: "spam"} and loaded.label2id == {"ham": 0, "spam": 1}
    assert AutoTokenizer.from_pretrained(onnx_dir).model_max_length == 48
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (onnx_dir / name).read_bytes() == (hf_dir / name).read_bytes(), name


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_onnx_runtime_fed_by_auto_tokenizer_gives_our_probabilities(onnx_dir, checkpoint, side, batch_size):
    """ONNX Runtime fed by transformers' tokenizer from the exported folder, as an ordinary ONNX text classifier
    is fed: mixed-length batches padded on either side."""
    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    tokenizer.padding_side = side
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = [*TEXTS, "free entry " * 60]
    got = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="np")
        got.append(session.run(["probabilities"], {name: batch[name] for name in ("input_ids", "attention_mask")})[0])
    torch.testing.assert_close(
        torch.from_numpy(np.concatenate(got)), our_probabilities(checkpoint, texts), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_id", [0, 7, 10**9, -1])
def test_onnx_pad_ids_of_any_value_change_nothing(onnx_dir, checkpoint, side, pad_id):
    """Padding on either side, with ids in the vocabulary, past it or negative, and a row with no real token
    (an empty text: ours reads it as <|endoftext|>)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, loaded.model.config.vocab_size, (n,), generator=g).tolist() for n in (9, 1, 30, 4, 0)]
    T = 33
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        input_ids[i, place], attention_mask[i, place] = torch.tensor(row, dtype=torch.long), 1
    _, probs = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    ours = predict_probabilities(loaded.model, [row or [loaded.tokenizer.eot_token] for row in rows])
    torch.testing.assert_close(torch.from_numpy(probs), ours, rtol=0, atol=1e-4)


def test_onnx_real_sms_texts_through_tokenizer_json(real_vocab_checkpoint, tmp_path):
    """GPT-2's real vocabulary and real messages in input (unsorted) order, batches of 16, tokenized by the
    tokenizers library alone from the exported tokenizer.json."""
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer

    onnx_dir = export_onnx(real_vocab_checkpoint, tmp_path / "onnx")
    tokenizer = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = load_sms_spam().texts[:160]
    got = []
    for start in range(0, len(texts), 16):
        encodings = tokenizer.encode_batch(texts[start : start + 16])
        feed = {name: np.array([getattr(e, name) for e in encodings]) for name in ("ids", "attention_mask")}
        got.append(
            session.run(["probabilities"], {"input_ids": feed["ids"], "attention_mask": feed["attention_mask"]})[0]
        )
    torch.testing.assert_close(
        torch.from_numpy(np.concatenate(got)), our_probabilities(real_vocab_checkpoint, texts), rtol=0, atol=1e-4
    )


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-onnx is not installed")
def test_the_readme_optimum_example_gives_our_probabilities(onnx_dir, checkpoint):
    """Optimum's ORTModelForSequenceClassification in transformers' pipeline, as docs/exports.md shows it (optimum-onnx
    needs transformers < 4.58, so this runs only where that pair is installed)."""
    code = readme_python("ORTModelForSequenceClassification", "docs/exports.md")
    code = code.replace('"exports/spamgpt-onnx"', repr(str(onnx_dir)))
    texts = [*TEXTS, "free entry " * 60]
    code = code.replace('classify(["WINNER!! Claim your free prize now", "See you at 5?"], truncation=True)', "")
    namespace = {}
    exec(code, namespace)
    for batch_size in (1, 3, 8):
        answers = namespace["classify"](texts, truncation=True, batch_size=batch_size)
        got = torch.tensor(
            [[{a["label"]: a["score"] for a in answer}[label] for label in ("ham", "spam")] for answer in answers]
        )
        torch.testing.assert_close(got, our_probabilities(checkpoint, texts), rtol=0, atol=1e-4)


def test_the_readme_onnx_example_truncates_to_the_checkpoints_max_tokens(onnx_dir, checkpoint):
    """docs/exports.md's ONNX example, run as a user copies it onto an export whose max_tokens (48) is not the default
    256: a text over it must give our probabilities, not a broadcast error or another budget's answer."""
    texts = ["See you at 5?", "free entry " * 60]
    code = readme_python("onnxruntime.InferenceSession", "docs/exports.md")
    code = code.replace('"exports/spamgpt-onnx"', repr(str(onnx_dir)))
    code = code.replace('["See you at 5?"]', repr(texts))
    namespace = {}
    exec(code, namespace)
    got = torch.from_numpy(namespace["probabilities"])
    torch.testing.assert_close(got, our_probabilities(checkpoint, texts), rtol=0, atol=1e-4)


# --- Command line ----------------------------------------------------------------------------------


def test_cli_export_hf_and_its_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(out)]) == 1
    assert "is not an empty directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 1
    assert "nothing: checkpoint directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("fmt", "extra"), [("hf", "export"), ("onnx", "onnx")])
def test_export_without_tokenizers_names_the_extra_and_writes_nothing(
    checkpoint, tmp_path, monkeypatch, capsys, fmt, extra
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else find_spec(name, *a)
    )
    out = tmp_path / fmt
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 1
    assert f"needs 'tokenizers': pip install 'spamgpt[{extra}]'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
