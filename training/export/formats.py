"""Exports of a checkpoint directory for other tools. The checkpoint stays the one format serving reads; these are
copies of it in other layouts, each giving the same probabilities.

- `hf`: the Hugging Face layout of `GPT2ForSequenceClassification` (config.json, model.safetensors, GPT-2's
  tokenizer files with tokenizer.json, README.md), which transformers' Auto classes and pipelines load with no extra
  code.
- `onnx`: one ONNX graph, (input_ids, attention_mask) -> (logits, probabilities), dynamic batch and sequence axes,
  beside the same config.json and tokenizer files, so the folder loads as a model directory (Optimum's
  ORTModelForSequenceClassification, or ONNX Runtime fed by transformers' AutoTokenizer).
"""

import importlib.util
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from training.config import ExportConfig
from training.finetune.data import SMS_CREDIT, is_sms_spam
from training.runtime.checkpoint import WEIGHTS_FILE, Checkpoint, ModelCard, load_checkpoint
from training.runtime.model import GPTClassifier, hf_key_map
from training.runtime.tokenizer import ENDOFTEXT

if TYPE_CHECKING:
    import tokenizers

HF_TOKENIZER_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}  # ours -> transformers' names
HF_TOKENIZER_JSON = "tokenizer.json"  # the one file the tokenizers library, TEI and vLLM read


def require_modules(extra: str, *modules: str) -> None:
    """Raise ImportError naming the first of `modules` that is not installed and the extra that installs it, before
    an export writes anything (torch's exporter would import onnx only mid-export, with a less helpful message)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"this export needs {module!r}: pip install 'spamgpt[{extra}]'")


def fold_score_bias(
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final LayerNorm's bias and a bias-free head's weight that give exactly the logits of
    `weight @ LayerNorm(h) + bias`, for every h: transformers' GPT2ForSequenceClassification head has no bias.

    ln_weight, ln_bias: (C,) the final LayerNorm's gamma and beta; weight: (n_labels, C); bias: (n_labels,).
    Returns (ln_bias', weight'), shaped as given, such that weight' @ (gamma * n + ln_bias') equals
    weight @ (gamma * n + ln_bias) + bias for every normalised n.

    Why it is exact, for any head (even one whose weight is zero or of low rank): LayerNorm subtracts the mean,
    so every normalised n sums to 0, and gamma * n is orthogonal to u = (1 / gamma) / |1 / gamma| (or to a unit
    vector e_i where some gamma_i is 0, the feature LayerNorm then leaves constant). Along u the LayerNorm's
    output is therefore the constant u . ln_bias. Shift ln_bias along u until that constant is 1, and add
    k u^T to the head: k times that constant feature is a bias, and k is chosen to make it the old bias plus
    what the shift added through the old weight. Computed in float64; the only error left is float32 rounding.
    """
    gamma, beta, w, b = (t.detach().double() for t in (ln_weight, ln_bias, weight, bias))
    zero = (gamma == 0).nonzero()
    if len(zero):
        u = torch.zeros_like(gamma)
        u[zero[0, 0]] = 1.0
    else:
        u = 1.0 / gamma
        u = u / u.norm()
    t = 1.0 - u @ beta  # beta' = beta + t u, so that u . beta' == 1
    k = b - t * (w @ u)  # (n_labels,)
    new_beta = beta + t * u
    new_w = w + torch.outer(k, u)
    return new_beta.to(ln_bias.dtype), new_w.to(weight.dtype)


def hf_state_dict(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """`model`'s weights under GPT2ForSequenceClassification's names (Conv1D weights transposed, as GPT-2 stores
    them), the head's bias folded into the final LayerNorm and the head (fold_score_bias); float32, CPU."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {}
    for hf_key, (our_key, transposed) in hf_key_map(model).items():
        out[f"transformer.{hf_key}"] = ours[our_key].t() if transposed else ours[our_key]
    out["transformer.ln_f.bias"], out["score.weight"] = fold_score_bias(
        ours["transformer.ln_f.weight"], ours["transformer.ln_f.bias"], ours["score.weight"], ours["score.bias"]
    )
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(checkpoint: Checkpoint) -> dict:
    """transformers' GPT2Config for the classifier: sizes from ours, GPT-2's fixed choices (tanh GELU, LayerNorm
    eps 1e-5, no dropout at inference), labels, and <|endoftext|> as pad_token_id. encode_ordinary never
    produces that id from text, so transformers' "rightmost token that is not padding" is each row's last real
    token, as in our pooling. The spamgpt card (max_tokens, threshold, base model, metrics) rides along."""
    config, card = checkpoint.model.config, checkpoint.card
    eot = checkpoint.tokenizer.eot_token
    return {
        "architectures": ["GPT2ForSequenceClassification"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        # GPT2Config reads it as n_positions; loaders that read config.json themselves (TEI) look for this name
        "max_position_embeddings": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",  # GELU, tanh approximation, as ours
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, as ours
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "id2label": {str(i): label for i, label in enumerate(card.labels)},
        "label2id": {label: i for i, label in enumerate(card.labels)},
        "problem_type": "single_label_classification",
        "torch_dtype": "float32",
        "spamgpt": _card_summary(card),
    }


def _card_summary(card: ModelCard) -> dict:
    return {
        "max_tokens": card.max_tokens,
        "threshold": None if card.threshold is None else asdict(card.threshold),
        # temperature and prior shift, already folded into the weights: the probabilities are at this prior
        "calibration": None if card.calibration is None else asdict(card.calibration),
        "base_model": card.base_model,
        "metrics": card.metrics,
        "version": card.version,
    }


def hf_tokenizer_config(checkpoint: Checkpoint) -> dict:
    """tokenizer_config.json: GPT-2's byte-level BPE from vocab.json and merges.txt, truncating to max_tokens on
    the right, padding on the right with <|endoftext|>; split_special_tokens makes "<|endoftext|>" inside a text
    plain text, as encode_ordinary reads it, so it can never pose as padding."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": checkpoint.card.max_tokens,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "split_special_tokens": True,
        "padding_side": "right",
        "truncation_side": "right",
    }


def hf_tokenizer(checkpoint: Checkpoint) -> "tokenizers.Tokenizer":
    """GPT-2's byte-level BPE as the `tokenizers` library builds it from the checkpoint's encoder.json (vocab.json)
    and vocab.bpe (merges.txt), component for component as transformers converts GPT2Tokenizer: no prefix space, no
    normaliser, GPT-2's pre-tokenizer regex. Truncation to max_tokens and right padding with <|endoftext|> are
    stored in it, so a plain `tokenizers` batch is what our engine reads (the ids, and an attention_mask that marks
    each row's real tokens).

    <|endoftext|> stays an ordinary vocabulary entry, not an added or special token: an added token would be split
    out of any text that contains it and become id eot, where encode_ordinary reads it as the characters it is.
    Its id is declared in config.json (pad_token_id, eos_token_id) and as the padding id here.

    Needs `tokenizers` (the `export` extra).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    files = checkpoint.path / "tokenizer"
    bpe = models.BPE.from_file(
        str(files / "encoder.json"),
        str(files / "vocab.bpe"),
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.enable_truncation(max_length=checkpoint.card.max_tokens, direction="right")
    tokenizer.enable_padding(direction="right", pad_id=checkpoint.tokenizer.eot_token, pad_token=ENDOFTEXT)
    return tokenizer


def write_hf_tokenizer(checkpoint: Checkpoint, out: Path) -> None:
    """transformers' tokenizer files for the checkpoint's tokenizer into `out`: vocab.json, merges.txt,
    tokenizer.json (hf_tokenizer), tokenizer_config.json and special_tokens_map.json.

    Needs `tokenizers` (the `export` extra); raises OSError for `out`.
    """
    tokenizer = hf_tokenizer(checkpoint)
    for ours, theirs in HF_TOKENIZER_FILES.items():
        shutil.copyfile(checkpoint.path / "tokenizer" / ours, out / theirs)
    tokenizer.save(str(out / HF_TOKENIZER_JSON))
    (out / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(checkpoint), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({name: ENDOFTEXT for name in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2) + "\n"
    )


def model_card_readme(checkpoint: Checkpoint) -> str:
    """README.md for the Hugging Face layout: what it is, how to load it, its test metrics and threshold."""
    card = checkpoint.card
    metrics = "\n".join(f"| {name} | {value} |" for name, value in card.metrics.items()) or "| (none recorded) | |"
    if card.threshold is None:
        rule = "The label is the argmax of the probabilities."
    else:
        rule = (
            f"spamgpt labels a text `{card.threshold.label}` where P({card.threshold.label}) >= "
            f"{card.threshold.value:.6g} (chosen on held-out rows); the pipeline above reports the "
            "probabilities and sorts by them, so apply this threshold yourself to get the same labels."
        )
    labels = ", ".join(f"`{label}`" for label in card.labels)
    if card.data is None:
        data = "Not recorded in the checkpoint."
    elif is_sms_spam(card.data.source):
        data = f"Fine-tuned on {SMS_CREDIT}."
    else:
        data = f"Fine-tuned on `{Path(card.data.source).name}` ({card.data.fingerprint['rows']} rows)."
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [spamgpt, gpt2, text-classification]
---

# spamgpt classifier ({card.base_model})

A GPT-2 classifier exported from a spamgpt checkpoint (spamgpt {card.version}). Labels: {labels}. Texts are
read up to {card.max_tokens} tokens; pass `truncation=True` for longer ones.

```python
from transformers import pipeline

classify = pipeline("text-classification", model="PATH/TO/THIS/DIR", top_k=None)
classify(["WINNER!! Claim your free prize now", "See you at 5?"], truncation=True)
```

The probabilities equal spamgpt's own. The score head's bias is folded into the final LayerNorm's bias and the
head's weight (GPT2ForSequenceClassification's head has none), so the logits are exact but the base model's
last hidden state differs from the checkpoint's along one direction.

## Decision rule

{rule}

## Training data

{data}

## Test metrics

| metric | value |
|---|---|
{metrics}
"""


def export_hf(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write `checkpoint_dir` into `out` (created) in the Hugging Face layout; returns `out`.

    Raises training.runtime.checkpoint.CheckpointError for a checkpoint that does not load, OSError for `out`,
    ImportError when `tokenizers` (the `export` extra) is not installed.
    """
    require_modules("export", "tokenizers")
    checkpoint = load_checkpoint(checkpoint_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(checkpoint.model), out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / WEIGHTS_FILE).chmod(0o644)
    (out / "config.json").write_text(json.dumps(hf_config(checkpoint), indent=2) + "\n")
    write_hf_tokenizer(checkpoint, out)
    (out / "README.md").write_text(model_card_readme(checkpoint))
    return out


# --- ONNX ------------------------------------------------------------------------------------------

ONNX_FILE = "model.onnx"
ONNX_OPSET = 18  # the dynamo exporter's default in torch 2.13 and what onnxruntime >= 1.14 runs
# transformers' names, so Optimum, TEI and ordinary ONNX text classifiers feed it as they feed any encoder
ONNX_INPUTS, ONNX_OUTPUTS = ("input_ids", "attention_mask"), ("logits", "probabilities")


class MaskedClassifier(nn.Module):
    """What the ONNX graph computes: (B, T) int64 token ids and (B, T) int64 attention_mask -> (B, n_labels)
    logits and their float32 softmax.

    A row's real tokens are the positions where its mask is nonzero, in order: they are moved to the front (right
    padding, as GPTClassifier.forward_padded reads it) and every other position becomes `fill_id`, so right, left
    or any other padding, with pad ids of any value (even outside the vocabulary), gives the logits of the real
    tokens alone. A row whose mask is all zero reads as one `fill_id` token, as encode_batch encodes an empty text.
    """

    def __init__(self, model: GPTClassifier, fill_id: int):
        super().__init__()
        self.model = model
        self.fill_id = fill_id  # <|endoftext|>: a valid id, and the token an empty text becomes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = input_ids.size(1)
        real = attention_mask != 0  # (B, T)
        positions = torch.arange(T, device=input_ids.device)
        # unique keys: real tokens sort first, each group in its original order
        order = torch.argsort(torch.where(real, positions, positions + T), dim=1)  # (B, T)
        idx = torch.where(real, input_ids, self.fill_id).gather(1, order)  # (B, T) right-padded
        lengths = real.sum(dim=1).clamp(min=1)  # (B,)
        logits = self.model.forward_padded(idx, lengths)
        return logits, torch.softmax(logits.float(), dim=-1)


def onnx_inputs(idx: torch.Tensor, lengths: torch.Tensor) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs for (B, T) right-padded ids and their (B,) lengths (training.runtime.inference
    pad_right): input_ids and an attention_mask with 1 on each row's first lengths[i] positions, both (B, T) int64."""
    mask = torch.arange(idx.size(1)) < lengths[:, None]  # (B, T)
    return {"input_ids": idx.numpy(), "attention_mask": mask.long().numpy()}


def export_onnx(checkpoint_dir: str | Path, out: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write `out` as a model directory for ONNX loaders; returns `out`. It holds model.onnx (float32, opset
    `opset`, MaskedClassifier), the Hugging Face export's config.json (architectures, model_type, id2label /
    label2id, max_position_embeddings, pad_token_id, the spamgpt card under "spamgpt") and tokenizer files
    (write_hf_tokenizer), and the checkpoint's tokenizer/ for training.runtime.tokenizer.load_tokenizer.

    Inputs: input_ids and attention_mask, (batch, sequence) int64, symbolic axes, as transformers' tokenizer from
    this folder gives them (`padding=True, truncation=True`: max_tokens, right padding). Outputs: logits and
    probabilities, (batch, n_labels) float32. Needs the `onnx` extra (onnxscript: torch's dynamo exporter;
    tokenizers: tokenizer.json).

    Raises training.runtime.checkpoint.CheckpointError for a checkpoint that does not load, OSError for `out`,
    ImportError when the onnx extra is missing.
    """
    require_modules("onnx", "onnx", "onnxscript", "tokenizers")
    checkpoint = load_checkpoint(checkpoint_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch's exporter trips over its own deprecations; a shared Dim is what we mean, not a clash
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=r".*axis name: (batch|sequence) will not be used", category=UserWarning
        )
        program = _onnx_program(checkpoint.model, checkpoint.tokenizer.eot_token, opset)
    program.save(str(out / ONNX_FILE))
    (out / "config.json").write_text(json.dumps(hf_config(checkpoint), indent=2) + "\n")
    write_hf_tokenizer(checkpoint, out)
    shutil.copytree(checkpoint.path / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return out


def _onnx_program(model: GPTClassifier, fill_id: int, opset: int) -> "torch.onnx.ONNXProgram":
    example = (torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=model.config.block_size)
    axes = {0: batch, 1: sequence}
    return torch.onnx.export(
        MaskedClassifier(model, fill_id).eval(),
        example,
        input_names=list(ONNX_INPUTS),
        output_names=list(ONNX_OUTPUTS),
        dynamic_shapes={"input_ids": axes, "attention_mask": axes},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


FORMATS = {"hf": export_hf, "onnx": export_onnx}


def export(config: ExportConfig) -> Path:
    """Export a checkpoint into another layout: the Hugging Face one (transformers, vLLM) or ONNX.

    Raises training.runtime.checkpoint.CheckpointError for a checkpoint that does not load, ValueError for an `out` that
    holds files, OSError for `out`; ImportError when the onnx extra is missing.
    """
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} is not an empty directory; refusing to write into it")
    written = FORMATS[config.format](config.checkpoint, out)
    print(f"{config.checkpoint} exported as {config.format} to {written}")
    return written
