"""The fine-tuning pipeline as plain functions: data, split, train, evaluate, export; and re-evaluation of an
exported checkpoint. The command line (training.cli) only maps options to these configs.

    from training.config import BaseModelConfig, DataConfig, FinetuneConfig, TrainConfig
    from training.finetune.pipeline import finetune
    finetune(FinetuneConfig(DataConfig("spam.csv"), BaseModelConfig(init="random"), TrainConfig(epochs=2)))
"""

import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tiktoken
import torch
from tqdm import tqdm

from training.config import BaseModelConfig, EvaluateConfig, FinetuneConfig, changed_options, flatten, from_flat
from training.finetune.base import base_classifier, base_config, pretrained_classifier
from training.finetune.calibration import fit_temperature
from training.finetune.data import (
    ROLES,
    SPLITS,
    Dataset,
    Duplicates,
    Partition,
    deduplicate,
    deduplicate_counted,
    fingerprint,
    is_mail_folder,
    load_dataset,
    partition,
    select_split,
    write_split,
)
from training.finetune.distributed import Group, process_group
from training.finetune.evaluate import (
    EVAL_BATCH_SIZE,
    Predictions,
    SplitMetrics,
    evaluation_report,
    predict,
    selection_warning,
    split_metrics,
    summary,
    write_report,
)
from training.finetune.feedback import (
    COMPARISON_FILE,
    compare_with_serving,
    is_feedback_store,
    load_corrections,
    with_corrections,
)
from training.finetune.loop import Examples, TrainState, train
from training.finetune.resume import STATE_FILE, load_state, save_state, state_dir
from training.finetune.sibling import prefix_source, recorded_prefix, recorded_sha256, sibling_model
from training.runtime.checkpoint import (
    CONFIG_FILE,
    REPORT_DIR,
    SPLIT_FILE,
    TOKENIZER_DIR,
    Checkpoint,
    CheckpointError,
    DataSummary,
    ModelCard,
    load_checkpoint,
    save_checkpoint,
    staged,
)
from training.runtime.device import resolve_device
from training.runtime.inference import (
    Calibration,
    fold_calibration,
    predict_logits,
    prior_shift,
    probabilities,
    require_finite,
)
from training.runtime.mail import DEFAULT_EXTRACTION
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.precision import training_precision
from training.runtime.tokenizer import encode_batch, load_gpt2_bpe

# Arguments that change where or how fast a run happens, not what it produces: skip_existing and resume ignore them.
# The data is compared by content (its fingerprint), not by the path or name that found it.
NOT_COMPARED = (
    *("out", "device", "skip_existing", "overwrite", "cache_prefix", "resume", "save_state", "data", "feedback"),
    *("compare_with", "force"),  # which checkpoint the result is compared with, and whether a worse one is exported
)
PATHS = ("weights", "tokenizer_dir", "prefix_from")  # compared as the files they name, wherever the run started


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune GPT-2 into a classifier, evaluate it and export a checkpoint directory (the reference's
    settings by default).

    Returns the directory written (`config.out`).

    Under torchrun, every process runs this: each trains on its share of every batch (training.finetune.distributed),
    rank 0 evaluates, exports and keeps the resume state, the others wait for it at a barrier.

    The card records the precision that ran (train.precision resolved, training.runtime.precision.training_precision),
    and in its metrics a "warning", also printed on the last line, when the selection rows are too few to show the
    false-positive rate --target-fpr asks for (training.finetune.evaluate.selection_warning).

    Nothing is replaced unasked: without `overwrite` (or `skip_existing`, which replaces a checkpoint of other
    arguments or data by design), a checkpoint in `out` trained with other arguments or data is refused; a rerun with
    the same arguments and data replaces it (it trains the same model). Without `resume` or `overwrite`, the state an
    interrupted run saved beside `out` is refused rather than discarded.

    Raises ValueError for an `out` that holds files but no checkpoint, or a checkpoint or saved state that this run
    would replace unasked (ReplaceRefused), data that cannot be split, a max_tokens beyond the base's positions (a
    local base's before the data is read), or a precision the device cannot compute natively;
    training.finetune.resume.ResumeError (a ValueError) for `resume` with state saved by other arguments or data;
    training.runtime.model.WeightsError when the base weights cannot be had; TokenizerError, OSError.
    """
    with process_group(config.train.device) as group:
        return _finetune(config, group)


def _finetune(config: FinetuneConfig, group: Group) -> Path:
    config = resolve_precision(config)
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {str(out)!r} holds files but no checkpoint; refusing to replace it")
    if config.base.base is not None and config.base.max_tokens is not None and Path(config.base.base).is_dir():
        # before the data is read; only the base's positions count here (no labels, no tokenizer to hold yet)
        check_base_positions(config.base, base_config(Path(config.base.base), n_labels=2, vocab_size=0).block_size)
    data = config.data
    source = load_dataset(data.data, data.text_column, data.label_column)
    unique, dropped = deduplicate_counted(source)
    source_fingerprint = fingerprint(source)  # a sha256 over every row: computed once, compared and recorded
    corrections = None if config.feedback is None else load_corrections(config.feedback)
    if corrections is not None:  # the data is the source and the corrections: both fingerprinted
        source_fingerprint |= {"feedback": fingerprint(corrections)}
    if config.skip_existing and matching_checkpoint(out, config, source_fingerprint, dropped):
        print(f"skip: {out} already holds a checkpoint trained with these arguments on this data")
        return out
    refuse_to_replace(config, source_fingerprint, dropped)
    if config.overwrite and not config.resume and group.is_main:
        shutil.rmtree(state_dir(out), ignore_errors=True)  # told to start over
    base = config.base
    sibling_of = None if base.prefix_from is None else prefix_source(config)
    if sibling_of is None:
        tokenizer_dir, enc = load_gpt2_bpe(base.tokenizer_dir)
    else:
        tokenizer_dir, enc = sibling_of.path / TOKENIZER_DIR, sibling_of.tokenizer
    parts = partition(unique, config.train.seed, config.balance)
    if corrections is not None:
        parts = with_corrections(parts, corrections, config.feedback_weight)
    elif is_feedback_store(data.data):  # the store alone: its corrections are the data
        corrections = unique
    label_names = unique.label_names()
    print(data_summary_line(data.data, source, dropped, parts))
    if sibling_of is None:
        warn_random_frozen(config)
        model = base_model(base, len(label_names), enc.n_vocab, config.train.seed)
        max_tokens = base.resolved_max_tokens(model.config.block_size)
    else:
        model = sibling_model(sibling_of, len(label_names), config.train.seed)
        max_tokens = base.max_tokens or sibling_of.card.max_tokens
    train_data, val_data = (encode(enc, ds, label_names, max_tokens) for ds in (parts.train, parts.validation))
    training_prior, class_weights = loss_prior(parts.train, label_names, config.balance)
    record = {"arguments": compared_arguments(config), "data": source_fingerprint}
    history = train(
        model,
        train_data,
        val_data,
        config.train,
        resume_from=saved_state(config, record, group),
        on_epoch_end=state_saver(config, record, group),
        group=group,
        class_weights=class_weights,
    )
    if not group.is_main:
        group.barrier()  # rank 0 evaluates and exports
        return out

    deployment_prior = label_rates(unique, label_names)
    calibration, raw = calibrate(model, enc, parts, label_names, max_tokens, training_prior, deployment_prior)
    shift = prior_shift(training_prior, deployment_prior, label_names)
    fold_calibration(model, calibration.temperature, shift)
    # The threshold is chosen on what the exported head computes, not on raw logits calibrated apart: the two
    # differ by float rounding, which would move the row chosen as the threshold to either side of it.
    roles = ("selection", "test", "evaluation")
    judged = role_logits(model, enc, parts, roles, label_names, max_tokens, "threshold and metrics")
    calibrated = {name: Predictions(probabilities(p.logits), p.targets) for name, p in judged.items()}
    uncalibrated = Predictions(probabilities(raw["evaluation"].logits), raw["evaluation"].targets)
    report = evaluation_report(
        label_names,
        calibrated["selection"],
        calibrated["test"],
        calibrated["evaluation"],
        config.threshold_objective,
        config.target_fpr,
        uncalibrated,
    )
    headline = summary(report)
    prefix = recorded_prefix(model, tokenizer_dir, config)
    assert sibling_of is None or prefix == sibling_of.card.prefix, f"a sibling's prefix changed: {prefix}"
    warning = selection_warning(label_names, calibrated["selection"], config.threshold_objective, config.target_fpr)
    card = ModelCard(
        labels=tuple(label_names),
        max_tokens=max_tokens,
        threshold=report.threshold,
        base_model=sibling_of.card.base_model
        if sibling_of
        else (base.base or base.preset) + ("" if base.init == "pretrained" else " (random init)"),
        metrics=headline.to_json() | {"best_epoch": history.best_epoch} | ({"warning": warning} if warning else {}),
        training=flatten(config),
        data=DataSummary(
            source=data.data,
            fingerprint=source_fingerprint,
            rows_after_dedup_and_balance=sum(len(getattr(parts, name).texts) for name in SPLITS),
            split=parts.sizes(),
            duplicates_dropped=asdict(dropped),
            labels_before_balancing=dict(sorted(Counter(unique.labels).items())),
        ),
        calibration=calibration,
        extraction=DEFAULT_EXTRACTION if is_mail_folder(data.data) else None,  # how load_dataset read the messages
        prefix=prefix,
    )
    # the report before and after, when the run learns from feedback or is told to compare; refused here when worse
    comparison = compare_with_serving(
        config, model, enc, max_tokens, label_names, report.threshold, corrections, parts.evaluation
    )
    print(f"writing the checkpoint, metrics.json and plots to {out}", file=sys.stderr)
    with staged(out) as staging:
        save_checkpoint(staging, model, tokenizer_dir, card)
        before_after = (uncalibrated, calibrated["evaluation"])
        write_report(staging / REPORT_DIR, report, calibrated["test"], history, before_after)
        write_split(staging / SPLIT_FILE, parts)
        if comparison is not None:
            (staging / REPORT_DIR / COMPARISON_FILE).write_text(json.dumps(comparison.to_json(), indent=2) + "\n")
    shutil.rmtree(state_dir(out), ignore_errors=True)  # the run is complete: nothing left to resume
    print(
        f"{headline.headline(card.threshold)}; checkpoint exported to {out}"
        + (f"; warning: {warning}" if warning else "")
    )
    group.barrier()
    return out


@dataclass
class Logits:
    """A role's raw (uncalibrated) logits beside its true label indices."""

    logits: torch.Tensor  # (N, n_labels) float32
    targets: torch.Tensor  # (N,)


def label_rates(ds: Dataset, label_names: list[str]) -> dict[str, float]:
    """{label: share of the rows}, in label_names' order."""
    counts = Counter(ds.labels)
    return {label: counts[label] / len(ds.labels) for label in label_names}


def loss_prior(
    train_rows: Dataset, label_names: list[str], balancing: str
) -> tuple[dict[str, float], torch.Tensor | None]:
    """The label distribution the loss sees, and the class weights that make it so (None: unweighted).

    "class-weighted" weighs each label by rows / (labels * its rows), so every label carries the same total
    weight and the loss sees a uniform prior; otherwise the loss sees the train rows' own rates (uniform after
    undersampling).
    """
    rates = label_rates(train_rows, label_names)
    if balancing != "class-weighted":
        return rates, None
    uniform = {label: 1 / len(label_names) for label in label_names}
    return uniform, torch.tensor([uniform[label] / rates[label] for label in label_names])


def calibrate(
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    parts: Partition,
    label_names: list[str],
    max_tokens: int,
    training_prior: dict[str, float],
    deployment_prior: dict[str, float],
) -> tuple[Calibration, dict[str, Logits]]:
    """The temperature fitted on the validation rows, weighed so that their labels count at the training prior
    (training.finetune.calibration.fit_temperature), and the raw logits of the validation rows it was fitted from and
    of the evaluation rows (the reliability diagram's "before").

    Raises training.runtime.inference.NonFiniteLogits naming rows whose logits are not finite.
    """
    raw = role_logits(model, enc, parts, ("validation", "evaluation"), label_names, max_tokens, "calibration")
    validation_rates = label_rates(parts.validation, label_names)
    weights = torch.tensor([training_prior[label] / max(validation_rates[label], 1e-12) for label in label_names])
    temperature = fit_temperature(raw["validation"].logits, raw["validation"].targets, weights)
    return Calibration(temperature, training_prior, deployment_prior), raw


def role_logits(
    model: GPTClassifier,
    enc: tiktoken.Encoding,
    parts: Partition,
    roles: tuple[str, ...],
    label_names: list[str],
    max_tokens: int,
    desc: str,
) -> dict[str, Logits]:
    """{role: the model's (N, n_labels) logits of the rows of that role of `parts`, with their label indices}; a
    progress bar named `desc` counts the rows on stderr.

    Raises training.runtime.inference.NonFiniteLogits naming rows whose logits are not finite.
    """
    out = {}
    total = sum(len(getattr(parts, name).texts) for name in roles)
    with tqdm(total=total, desc=f"{desc}: {', '.join(roles)}", unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        for name in roles:
            rows = encode(enc, getattr(parts, name), label_names, max_tokens)
            logits = require_finite(predict_logits(model, rows.rows, EVAL_BATCH_SIZE, on_batch=bar.update))
            out[name] = Logits(logits, torch.tensor(rows.targets, dtype=torch.long))
    return out


def resolve_precision(config: FinetuneConfig) -> FinetuneConfig:
    """`config` with train.precision resolved to what runs on its device (training_precision): the card and the
    resume state record what ran, and a run matches an earlier one only if it computes in the same precision.

    Raises ValueError for a precision the device cannot compute natively.
    """
    device = resolve_device(config.train.device)
    return replace(config, train=replace(config.train, precision=training_precision(config.train.precision, device)))


def saved_state(config: FinetuneConfig, record: dict, group: Group) -> TrainState | None:
    """With `config.resume`, the state an interrupted run writing `config.out` saved (None when there is none);
    else None (refuse_to_replace has made sure there is none to lose). record: this run's arguments and data
    (state_saver's).

    Raises training.finetune.resume.ResumeError when the saved state is of other arguments or data.
    """
    directory = state_dir(config.out)
    if not config.resume:
        return None
    state = load_state(directory, record)
    if group.is_main:
        print(
            f"resuming after epoch {state.epoch} from {directory}"
            if state is not None
            else f"no saved state at {directory}; training from the start"
        )
    return state


def state_saver(config: FinetuneConfig, record: dict, group: Group) -> Callable[[TrainState], None] | None:
    """train()'s on_epoch_end: saving the state with `record` beside `config.out` (with `config.save_state`, on
    rank 0 only); None otherwise."""
    if not (config.save_state and group.is_main):
        return None
    directory = state_dir(config.out)
    return lambda state: save_state(directory, state, record)


def compared_arguments(config: FinetuneConfig) -> dict:
    """The run's arguments, flat, without those that change where or how fast it runs (NOT_COMPARED), with PATHS
    made absolute."""
    arguments = flatten(config)
    resolved = {name: str(Path(arguments[name]).resolve()) for name in PATHS if arguments[name] is not None}
    return {k: v for k, v in (arguments | resolved).items() if k not in NOT_COMPARED}


def data_summary_line(source_name: str, source: Dataset, dropped: Duplicates, parts: Partition) -> str:
    """What training is about to learn from, printed before it starts: the labels and their counts as read, the
    duplicates dropped, and the rows of each role with their labels."""

    def counts(ds: Dataset) -> str:
        return ", ".join(f"{label!r} {n}" for label, n in sorted(Counter(ds.labels).items()))

    roles = "; ".join(f"{name} {len(getattr(parts, name).texts)} ({counts(getattr(parts, name))})" for name in ROLES)
    return (
        f"data {source_name}: {len(source.texts)} rows, {len(source.label_names())} labels ({counts(source)}); "
        f"dropped {dropped.exact} exact and {dropped.near} near duplicates; {roles}"
    )


def warn_random_frozen(config: FinetuneConfig) -> None:
    """One line on stderr when random initial weights meet frozen blocks (--trainable last-blocks or lora): the
    frozen random blocks are poor features, and the model trained on them is weak."""
    if config.base.init == "random" and config.train.trainable != "all":
        print(
            f"warning: --init random with --trainable {config.train.trainable} keeps random blocks frozen, which "
            "trains a weak model; --trainable all trains every block (./run.sh: SPAMGPT_TRAINABLE=all)",
            file=sys.stderr,
        )


def base_model(base: BaseModelConfig, n_labels: int, vocab_size: int, seed: int) -> GPTClassifier:
    """The classifier before fine-tuning, sized by base.base's config.json or by the preset: its base's weights
    (OpenAI's, base.weights or base.base's) with a seeded head, or all random.

    Raises training.runtime.model.WeightsError when the base cannot be had or does not fit; ValueError for a max_tokens
    beyond the base's positions.
    """
    torch.manual_seed(seed)  # the head (and everything, with init random) starts from the seed
    if base.base is not None:
        model = base_classifier(base.base, n_labels, vocab_size, pretrained=base.init == "pretrained")
        check_base_positions(base, model.config.block_size)
        return model
    config = GPTConfig.from_preset(base.preset, vocab_size=vocab_size, n_labels=n_labels)
    if base.init == "random":
        return GPTClassifier(config)
    return pretrained_classifier(config, base.preset, source=base.weights)


def check_base_positions(base: BaseModelConfig, block_size: int) -> None:
    """Raises ValueError for a base.max_tokens beyond `block_size`, the positions of base.base. finetune checks a
    local base before it reads the data, and base_model a Hub base once it is had."""
    if base.max_tokens is not None and base.max_tokens > block_size:
        raise ValueError(f"max_tokens must lie in 1..{block_size} for base {base.base!r}, got {base.max_tokens!r}")


def encode(enc: tiktoken.Encoding, ds: Dataset, label_names: list[str], max_tokens: int) -> Examples:
    """Token ids truncated to max_tokens, with label indices in label_names' order."""
    rows, _ = encode_batch(enc, ds.texts, max_tokens)
    return Examples(rows, [label_names.index(label) for label in ds.labels])


class ReplaceRefused(ValueError):
    """A run that would replace, unasked, a checkpoint of other arguments or data, or an interrupted run's state; the
    message says what differs and which option goes on."""


def refuse_to_replace(config: FinetuneConfig, data_fingerprint: dict, dropped: Duplicates) -> None:
    """Raise ReplaceRefused when this run would replace what it was not told to: a checkpoint in `config.out`
    trained with other arguments or data (unless `overwrite` or `skip_existing`), or the state an interrupted run
    saved beside it (unless `resume` or `overwrite`)."""
    out = Path(config.out)
    if not (config.overwrite or config.skip_existing) and (out / CONFIG_FILE).is_file():
        difference = checkpoint_difference(out, config, data_fingerprint, dropped)
        if difference is not None:
            raise ReplaceRefused(
                f"{out} {difference}; refusing to replace it: pass --overwrite to replace it, or another --out"
            )
    state = state_dir(out) / STATE_FILE
    if not (config.resume or config.overwrite) and state.is_file():
        raise ReplaceRefused(
            f"{state.parent} holds the state of an interrupted run writing {out}; pass --resume to continue it, or "
            "--overwrite to start over and discard it"
        )


def checkpoint_difference(out: Path, config: FinetuneConfig, data_fingerprint: dict, dropped: Duplicates) -> str | None:
    """Why the checkpoint in `out` (which holds config.json) is not one of this run's arguments and data,
    deduplicated the same way, as words that follow its path; None when it is."""
    try:
        checkpoint = load_checkpoint(out)
        trained_with = training_config(checkpoint)
    except (CheckpointError, ValueError) as exc:
        return f"holds no usable checkpoint ({exc})"
    card = checkpoint.card
    recorded = {} if trained_with is None else compared_arguments(trained_with)
    wanted = compared_arguments(config)
    changed = changed_options(wanted, recorded)
    if changed:
        was = ", ".join(f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        return f"was trained with other arguments ({', '.join(changed)}): {was}"
    if card.data is None or card.data.fingerprint != data_fingerprint:
        recorded_sha = None if card.data is None else card.data.fingerprint.get("sha256")
        return f"was trained on other data (sha256 {recorded_sha}, this data {data_fingerprint.get('sha256')})"
    if card.data.duplicates_dropped != asdict(dropped):
        was, now = card.data.duplicates_dropped, asdict(dropped)
        return f"was trained on data deduplicated another way (dropped {was}, this run {now})"
    base_prefix = None if config.base.prefix_from is None else recorded_sha256(config.base.prefix_from)
    if base_prefix is not None and (card.prefix is None or card.prefix.sha256 != base_prefix):
        return f"was trained on another prefix than --prefix-from's now ({base_prefix})"
    return None


def matching_checkpoint(out: Path, config: FinetuneConfig, data_fingerprint: dict, dropped: Duplicates) -> bool:
    """Whether `out` holds a valid checkpoint whose arguments and data are this run's, deduplicated the same way;
    prints why not."""
    if not (out / CONFIG_FILE).is_file():
        print(f"no checkpoint at {out} yet; training one")
        return False
    difference = checkpoint_difference(out, config, data_fingerprint, dropped)
    if difference is not None:
        print(f"{out} {difference}; training a new one")
    return difference is None


def training_config(checkpoint: Checkpoint) -> FinetuneConfig | None:
    """The arguments of the run that wrote `checkpoint`, from its card's training record (options added since
    take their defaults); None for a checkpoint not written by `finetune`.

    Raises ValueError naming config.json and the option whose recorded value is not valid.
    """
    if not checkpoint.card.training:
        return None
    try:
        return from_flat(FinetuneConfig, checkpoint.card.training)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{checkpoint.path / CONFIG_FILE}: invalid 'training' record ({exc})") from exc


def evaluate(config: EvaluateConfig) -> SplitMetrics:
    """Re-evaluate an exported checkpoint on a dataset, at argmax and at the checkpoint's threshold.

    Returns the metrics, also written to `config.out` when set (with the checkpoint, data, split, the data's
    fingerprint and the decision threshold beside them).

    Raises CheckpointError for a checkpoint that cannot be loaded; ValueError for a split that selects nothing
    or labels the model does not know.
    """
    checkpoint = load_checkpoint(config.checkpoint, device=resolve_device(config.device))
    card, data = checkpoint.card, config.data
    # messages are read as the checkpoint's training read them (a checkpoint of plain texts: the default)
    extraction = card.extraction or DEFAULT_EXTRACTION
    ds = deduplicate(load_dataset(data.data, data.text_column, data.label_column, extraction))
    if config.split != "all":
        rows_given = len(ds.texts)
        ds = select_split(ds, checkpoint.path / SPLIT_FILE, config.split)
        print(f"{len(ds.texts)} of {rows_given} distinct rows are in the checkpoint's {config.split} split")
    rows, _ = encode_batch(checkpoint.tokenizer, ds.texts, card.max_tokens)
    metrics = split_metrics(predict(checkpoint.model, rows, ds.labels, card.labels), card.labels, card.threshold)
    for decision, m in metrics.decisions().items():
        auc = "n/a" if m.roc_auc is None else f"{m.roc_auc:.4f}"
        print(f"{decision}: n {m.n}, accuracy {m.accuracy:.4f}, macro F1 {m.macro_f1:.4f}, ROC-AUC {auc}")
        print(f"  confusion matrix (rows true, columns predicted; {list(card.labels)}): {m.confusion_matrix}")
        for label, c in m.per_class.items():
            described = ", ".join(f"{f.name} {getattr(c.rates, f.name).describe()}" for f in fields(c.rates))
            print(f"  {label}: {described}")
    if config.out:
        result = {
            "checkpoint": str(checkpoint.path),
            "data": data.data,
            "split": config.split,
            "fingerprint": fingerprint(ds),
            "decision_threshold": None if card.threshold is None else asdict(card.threshold),
            **metrics.to_json(),
        }
        Path(config.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"metrics written to {config.out}")
    return metrics
