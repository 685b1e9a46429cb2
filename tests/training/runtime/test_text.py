import functools
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from collections import defaultdict

import pytest

from training.finetune.data import load_table
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
        # no character: UTF-8 cannot encode it and the tokenizer reads it as U+FFFD, so the model would see a
        # replacement character the sender never wrote
        pytest.param("\ud800", False, id="lone-surrogate"),
        pytest.param("\udc00\ud800", False, id="reversed-surrogate-pair"),
        pytest.param("\ufdd0\uffff\U0010fffe", False, id="noncharacters"),
        pytest.param("\u2065\ufff0\U000e0fff", False, id="unassigned-default-ignorable"),
        pytest.param("\u180b\u17b4\U000e0100", False, id="ignorable-marks"),
        pytest.param("\ue000", True, id="private-use"),
        pytest.param("\u0378", True, id="unassigned"),
        pytest.param("\U0001fae8", True, id="newer-emoji"),  # unassigned in older Unicode databases: still shown
    ],
)
def test_has_visible_characters(text, visible):
    assert has_visible_characters(text) is visible
    assert bool(re.search(visible_character_pattern(), text)) is visible


def test_the_visible_character_pattern_is_the_rule_for_every_code_point():
    pattern = re.compile(visible_character_pattern())
    disagree = [c for c in range(sys.maxunicode + 1) if bool(pattern.search(chr(c))) != has_visible_characters(chr(c))]
    assert disagree == []


# The rule, by general category: visible or not, and the code points that are the exceptions (Unicode's
# Default_Ignorable_Code_Point, noncharacters, the braille blank); the module docstring says why
INVISIBLE = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}
NONCHARACTERS = {
    *range(0xFDD0, 0xFDF0),
    *(plane + end for plane in range(0, 0x110000, 0x10000) for end in (0xFFFE, 0xFFFF)),
}
EXCEPTIONS = {
    "Mn": {0x034F, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)},
    "Lo": {0x115F, 0x1160, 0x3164, 0xFFA0},
    "So": {0x2800},
    "Cn": NONCHARACTERS
    | {c for c in (0x2065, *range(0xFFF0, 0xFFF9), *range(0xE0000, 0xE1000)) if unicodedata.category(chr(c)) == "Cn"},
}
CATEGORIES = (
    "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe",
    "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn",
)  # fmt: skip


@functools.cache
def code_points_by_category() -> dict[str, list[int]]:
    by_category = defaultdict(list)
    for code in range(sys.maxunicode + 1):
        by_category[unicodedata.category(chr(code))].append(code)
    return by_category


def test_the_categories_are_all_of_unicodes():
    assert set(code_points_by_category()) == set(CATEGORIES)


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_general_category_is_visible_or_not_but_for_its_exceptions(category):
    visible = category not in INVISIBLE
    differ = {c for c in code_points_by_category()[category] if has_visible_characters(chr(c)) is not visible}
    assert differ == EXCEPTIONS.get(category, set())


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node, for ECMAScript's regular expressions")
def test_ecmascript_reads_the_pattern_as_python_does(tmp_path):
    """The pattern as the OpenAPI document carries it (JSON), compiled by node with the u flag, against every code
    point, lone surrogates included."""
    visible = tmp_path / "visible"
    visible.write_bytes(bytes(has_visible_characters(chr(c)) for c in range(sys.maxunicode + 1)))
    script = f"""
    const pattern = new RegExp(JSON.parse({json.dumps(json.dumps(visible_character_pattern()))}), "u");
    const visible = require("fs").readFileSync({json.dumps(str(visible))});
    const disagree = [];
    for (let c = 0; c < visible.length; c++) {{
        if (pattern.test(String.fromCodePoint(c)) !== (visible[c] === 1)) disagree.push(c);
    }}
    console.log(JSON.stringify(disagree.slice(0, 20)));
    """
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_a_rust_json_schema_validator_reads_the_pattern_as_python_does():
    """jsonschema-rs (schemathesis' validator) compiles patterns with Rust's regex, which reads UTF-8 and refuses a
    surrogate escape; over every code point a Rust string can hold, it agrees with the rule."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": visible_character_pattern()})
    scalars = (c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    assert [c for c in scalars if validator.is_valid(chr(c)) != has_visible_characters(chr(c))] == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("\uffff", id="noncharacter"),
        pytest.param("\u180b\ufe0f", id="ignorable-marks"),
        pytest.param("\u2065", id="unassigned-default-ignorable"),
    ],
)
def test_training_refuses_a_row_with_nothing_visible_by_its_line(tmp_path, text):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "hi", "label": "ham"}, {"text": text, "label": "spam"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # ASCII JSON: escapes, as a client writes
    with pytest.raises(ValueError, match=r"a\.jsonl, line 2: text has no visible characters"):
        load_table(path)
