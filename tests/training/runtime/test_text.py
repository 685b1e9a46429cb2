import re
import sys

import pytest

from training.runtime.text import has_visible_characters, visible_character_pattern


@pytest.mark.parametrize(
    ("text", "visible"),
    [
        pytest.param(" ", False, id="space"),
        pytest.param("\n\t ", False, id="whitespace"),
        pytest.param("\u200b", False, id="zero-width-space"),
        pytest.param("\u3000", False, id="ideographic-space"),
        pytest.param("\u00a0\u2028\u202f\u205f", False, id="other-spaces"),
        pytest.param("\ufeff\u2060\u200d\u200e\u00ad\U000e0041", False, id="format-characters"),
        pytest.param("\x00\x07\x1b", False, id="controls"),
        pytest.param("\u3164\u115f\uffa0\u2800\u034f\ufe0f\U000e0100", False, id="blanks-and-selectors"),
        pytest.param("", False, id="empty"),
        pytest.param("a", True, id="letter"),
        pytest.param("\u200b \u3000.", True, id="a-dot-among-invisibles"),
        pytest.param("\u0301", True, id="lone-combining-mark"),
        pytest.param("🎁", True, id="emoji"),
        pytest.param("\ud800", True, id="lone-surrogate"),
        pytest.param("\ue000", True, id="private-use"),
    ],
)
def test_has_visible_characters(text, visible):
    assert has_visible_characters(text) is visible
    assert bool(re.search(visible_character_pattern(), text)) is visible


def test_the_visible_character_pattern_is_the_rule_for_every_code_point():
    pattern = re.compile(visible_character_pattern())
    disagree = [c for c in range(sys.maxunicode + 1) if bool(pattern.search(chr(c))) != has_visible_characters(chr(c))]
    assert disagree == []
