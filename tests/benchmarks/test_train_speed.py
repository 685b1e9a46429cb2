"""train_speed's targets: the speed-up of ours in the fastest precision that ran, and bfloat16's validation accuracy
against float32's in rows."""

import pytest

from benchmarks.train_speed import TARGET_ACCURACY_ROWS, TARGET_SPEEDUP, targets


def ours(speedup: float, val_accuracy: float) -> dict:
    return {"speedup_vs_reference": speedup, "val_accuracy": val_accuracy}


def test_float32_alone_is_held_to_the_speed_target_and_has_no_accuracy_comparison():
    result = targets({"ours_float32": ours(13.0, 0.9), "reference": ours(1.0, 0.8)}, 130, "float32")

    assert result == {
        "speedup_vs_reference": {"loop": "ours_float32", "target": TARGET_SPEEDUP, "value": 13.0, "met": False}
    }


@pytest.mark.parametrize(
    ("bfloat16_correct", "met"),
    [
        pytest.param(120, True, id="same-rows"),
        pytest.param(120 - TARGET_ACCURACY_ROWS, True, id="at-the-bar"),
        pytest.param(120 + TARGET_ACCURACY_ROWS + 1, False, id="past-the-bar-above"),
        pytest.param(120 - TARGET_ACCURACY_ROWS - 1, False, id="past-the-bar-below"),
    ],
)
def test_bfloat16_is_held_to_the_speed_target_and_to_float32_accuracy_within_rows(bfloat16_correct, met):
    results = {"ours_float32": ours(12.0, 120 / 130), "ours_bfloat16": ours(21.0, bfloat16_correct / 130)}

    result = targets(results, 130, "bfloat16")

    assert result["speedup_vs_reference"] == {
        "loop": "ours_bfloat16",
        "target": TARGET_SPEEDUP,
        "value": 21.0,
        "met": True,
    }
    assert result["bfloat16_val_accuracy_vs_float32_rows"] == {
        "target": TARGET_ACCURACY_ROWS,
        "value": bfloat16_correct - 120,
        "met": met,
    }
