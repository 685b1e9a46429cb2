"""The fine-tuning pipeline as plain functions: data, split, train, evaluate, export; and re-evaluation of an
exported checkpoint. The command line (training.cli) only maps options to these configs.

    from training.config import BaseModelConfig, DataConfig, FinetuneConfig, TrainConfig
    from training.pipeline import finetune
    finetune(FinetuneConfig(DataConfig("spam.csv"), BaseModelConfig(init="random"), TrainConfig(epochs=2)))
"""

import json
from dataclasses import asdict
from pathlib import Path

import tiktoken
import torch

from training.checkpoint import (
    CONFIG_FILE,
    REPORT_DIR,
    SPLIT_FILE,
    CheckpointError,
    DataSummary,
    ModelCard,
    load_checkpoint,
    save_checkpoint,
    staged,
)
from training.config import BaseModelConfig, EvaluateConfig, FinetuneConfig, flatten
from training.data import (
    SPLITS,
    Dataset,
    balance,
    deduplicate,
    fingerprint,
    load_dataset,
    select_split,
    stratified_split,
    write_split,
)
from training.device import resolve_device
from training.evaluate import evaluation_report, predict, split_metrics, summary, write_report
from training.finetune import Examples, train
from training.hf_base import base_classifier
from training.inference import Threshold
from training.model import GPTClassifier, GPTConfig, pretrained_classifier
from training.tokenizer import encode_batch, fetch_gpt2_bpe, load_tokenizer

# Arguments that change where or how fast a run happens, not what it produces: skip_existing ignores them.
NOT_COMPARED = ("out", "device", "skip_existing", "cache_dir", "cache_prefix")


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune GPT-2 into a classifier and export a checkpoint directory to `config.out` (the reference's
    settings by default); returns that directory.

    Raises ValueError for an `out` that holds files but no checkpoint, or data that cannot be split;
    training.model.WeightsError when the base weights cannot be had; DownloadError, TokenizerError, OSError.
    """
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {str(out)!r} holds files but no checkpoint; refusing to replace it")
    data = config.data
    source = load_dataset(data.data, config.cache_dir, data.text_column, data.label_column)
    if config.skip_existing and matching_checkpoint(out, config, fingerprint(source)):
        print(f"skip: {out} already holds a checkpoint trained with these arguments on this data")
        return out
    base = config.base
    tokenizer_dir = Path(base.tokenizer_dir) if base.tokenizer_dir else fetch_gpt2_bpe(config.cache_dir)
    enc = load_tokenizer(tokenizer_dir)
    prepared = balance(deduplicate(source), config.train.seed) if config.balance else deduplicate(source)
    split = stratified_split(prepared, config.train.seed)
    label_names = prepared.label_names()
    model = base_model(base, len(label_names), enc.n_vocab, config.train.seed)
    train_data, val_data, test_data = (
        encode(enc, getattr(split, name), label_names, base.max_tokens) for name in SPLITS
    )
    history = train(model, train_data, val_data, config.train)

    validation, test = (
        predict(model, ds.rows, [label_names[t] for t in ds.targets], label_names) for ds in (val_data, test_data)
    )
    report = evaluation_report(label_names, validation, test)
    card = ModelCard(
        labels=tuple(label_names),
        max_tokens=base.max_tokens,
        threshold=report["threshold"],
        base_model=(base.base or base.preset) + ("" if base.init == "pretrained" else " (random init)"),
        metrics={**summary(report), "best_epoch": history.best_epoch},
        training=config,
        data=DataSummary(
            source=data.data,
            fingerprint=fingerprint(source),
            rows_after_dedup_and_balance=len(prepared.texts),
            split={name: len(getattr(split, name).texts) for name in SPLITS},
        ),
    )
    with staged(out) as staging:
        save_checkpoint(staging, model, tokenizer_dir, card)
        write_report(staging / REPORT_DIR, report, test, history.to_dict())
        write_split(staging / SPLIT_FILE, split)
    print(f"{headline(card.metrics, card.threshold)}; checkpoint exported to {out}")
    return out


def base_model(base: BaseModelConfig, n_labels: int, vocab_size: int, seed: int) -> GPTClassifier:
    """The classifier before fine-tuning, sized by base.base's config.json or by the preset: its base's weights
    (OpenAI's, base.weights or base.base's) with a seeded head, or all random.

    Raises training.model.WeightsError when the base cannot be had or does not fit; ValueError for a max_tokens
    beyond the base's positions.
    """
    torch.manual_seed(seed)  # the head (and everything, with init random) starts from the seed
    if base.base is not None:
        model = base_classifier(base.base, n_labels, vocab_size, pretrained=base.init == "pretrained")
        if base.max_tokens > model.config.block_size:
            raise ValueError(
                f"max_tokens must lie in 1..{model.config.block_size} for base {base.base!r}, got {base.max_tokens!r}"
            )
        return model
    config = GPTConfig.from_preset(base.preset, vocab_size=vocab_size, n_labels=n_labels)
    if base.init == "random":
        return GPTClassifier(config)
    return pretrained_classifier(config, base.preset, source=base.weights)


def encode(enc: tiktoken.Encoding, ds: Dataset, label_names: list[str], max_tokens: int) -> Examples:
    """Token ids truncated to max_tokens, with label indices in label_names' order."""
    rows, _ = encode_batch(enc, ds.texts, max_tokens)
    return Examples(rows, [label_names.index(label) for label in ds.labels])


def matching_checkpoint(out: Path, config: FinetuneConfig, data_fingerprint: dict) -> bool:
    """Whether `out` holds a valid checkpoint whose arguments and data are this run's; prints why not."""
    if not (out / CONFIG_FILE).is_file():
        print(f"no checkpoint at {out} yet; training one")
        return False
    try:
        card = load_checkpoint(out).card
    except CheckpointError as exc:
        print(f"{out} holds no usable checkpoint ({exc}); training a new one")
        return False
    wanted = {k: v for k, v in flatten(config).items() if k not in NOT_COMPARED}
    recorded = {} if card.training is None else flatten(card.training)
    recorded = {k: v for k, v in recorded.items() if k not in NOT_COMPARED}
    changed = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
    if changed:
        print(f"{out} was trained with other arguments ({', '.join(changed)}); training a new one")
        return False
    if card.data is None or card.data.fingerprint != data_fingerprint:
        print(f"{out} was trained on other data; training a new one")
        return False
    return True


def headline(metrics: dict, threshold: Threshold | None) -> str:
    """One line of the card's test metrics, at argmax and at the threshold."""

    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    line = (
        f"test accuracy {num(metrics['test_accuracy'])}, F1 ({metrics['f1_label']}) {num(metrics['test_f1'])}, "
        f"ROC-AUC {num(metrics['test_roc_auc'])}"
    )
    if threshold is not None:
        line += (
            f"; at threshold {threshold.label} >= {threshold.value:.3f}: accuracy "
            f"{num(metrics['test_accuracy_at_threshold'])}, F1 {num(metrics['test_f1_at_threshold'])}"
        )
    return line


def evaluate(config: EvaluateConfig) -> dict:
    """Re-evaluate an exported checkpoint on a dataset, at argmax and at the checkpoint's threshold; returns the
    metrics (and writes them to `config.out` when set).

    Raises CheckpointError for a checkpoint that cannot be loaded; ValueError for a split that selects nothing
    or labels the model does not know.
    """
    checkpoint = load_checkpoint(config.checkpoint, device=resolve_device(config.device))
    card, data = checkpoint.card, config.data
    ds = deduplicate(load_dataset(data.data, config.cache_dir, data.text_column, data.label_column))
    if config.split != "all":
        ds = select_split(ds, checkpoint.path / SPLIT_FILE, config.split)
    rows, _ = encode_batch(checkpoint.tokenizer, ds.texts, card.max_tokens)
    predictions = predict(checkpoint.model, rows, ds.labels, card.labels)
    result = {
        "checkpoint": str(checkpoint.path),
        "data": data.data,
        "split": config.split,
        "fingerprint": fingerprint(ds),
        "decision_threshold": card.threshold,
        **split_metrics(predictions, card.labels, card.threshold),  # "argmax" and "threshold" metrics
    }
    for decision in ("argmax", "threshold"):
        if decision in result:
            m = result[decision]
            auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
            print(f"{decision}: n {m['n']}, accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, ROC-AUC {auc}")
            print(f"  confusion matrix (rows true, columns predicted; {list(card.labels)}): {m['confusion_matrix']}")
    if config.out:
        Path(config.out).write_text(json.dumps(result, indent=2, default=asdict) + "\n")
        print(f"metrics written to {config.out}")
    return result
