"""A Prediction (training.runtime.classifier) as a row of results outside the server: the columns `predict` adds to
a file's rows and Ray Data to a dataset's, and which texts they score at all. The values are those `POST /classify`
answers for the same text: both build them from Classifier.predictions."""

from training.runtime.classifier import Prediction
from training.runtime.text import has_visible_characters


def usable_text(value) -> bool:
    """Whether a value can be scored: a string with a visible character (training.runtime.text
    .has_visible_characters, the rule training and the server apply)."""
    return isinstance(value, str) and has_visible_characters(value)


def result_columns(labels: tuple[str, ...]) -> list[str]:
    """The names of a result record's fields, in order: label, probability_<label> for each of the model's
    `labels`, tokens (after truncation), truncated."""
    return ["label", *(f"probability_{label}" for label in labels), "tokens", "truncated"]


def result_record(prediction: Prediction) -> dict:
    """A Prediction as a flat record in result_columns' order: {"label", "probability_<label>": float in 0..1 for
    each label, "tokens": int, "truncated": bool}."""
    return {
        "label": prediction.label,
        **{f"probability_{label}": p for label, p in prediction.probabilities.items()},
        "tokens": prediction.tokens,
        "truncated": prediction.truncated,
    }
