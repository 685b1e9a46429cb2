"""What counts as a text: the rule by which training refuses a row and every serving route a text that shows
nothing (whitespace, invisible format characters)."""

import functools
import sys
import unicodedata

NO_VISIBLE_CHARACTERS = "has no visible characters (only whitespace or invisible format characters)"
# Characters that show nothing yet are neither whitespace nor format characters: Hangul fillers, the braille
# blank, the combining grapheme joiner. Variation selectors (which only modify the character before) are ranges.
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
_VARIATION_SELECTORS = (range(0xFE00, 0xFE10), range(0xE0100, 0xE01F0))


def _invisible(char: str) -> bool:
    """Whitespace, a control character (Cc), a format character (Cf: zero width space and joiners, bidi marks,
    the byte order mark, soft hyphen, tags) or one of the blanks above."""
    return (
        char.isspace()
        or unicodedata.category(char) in ("Cc", "Cf")
        or char in _BLANK
        or any(ord(char) in selectors for selectors in _VARIATION_SELECTORS)
    )


def has_visible_characters(text: str) -> bool:
    """Whether `text` has at least one character that shows: the one rule for an empty text, by which training
    refuses a row and serving a text (e.g. " ", "\\n\\t ", "\\u200b", "\\u3000" have none)."""
    stripped = text.strip()
    if stripped and not _invisible(stripped[0]):  # the common case, at once
        return True
    return not all(map(_invisible, set(stripped)))  # distinct characters: few, however long the text


@functools.cache
def visible_character_pattern() -> str:
    """A regular expression that a text contains (re.search; JSON Schema's `pattern`) exactly when
    has_visible_characters(text): a class of every character but the invisible ones, written so that Python's
    and ECMAScript's (with the u flag) regular expressions read it alike. Built once, by asking every code point."""
    # every whitespace character is Cc, Zs, Zl or Zp: this cheap test finds all candidates (about 1 s)
    kinds = ("Cc", "Cf", "Zs", "Zl", "Zp")
    candidates = (c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in kinds)
    invisible = sorted(
        {*(c for c in candidates if _invisible(chr(c))), *map(ord, _BLANK)} | set().union(*_VARIATION_SELECTORS)
    )
    ranges = []  # [first, last] of each run of consecutive code points
    for code in invisible:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])

    def char(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    return "[^" + "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges) + "]"
