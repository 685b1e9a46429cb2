"""What counts as a text: the rule by which training refuses a row and every serving route a text that shows
nothing. A text shows something when it holds at least one visible character; by Unicode general category:

- Cc controls, Cf format characters (zero width space and joiners, bidi marks, the byte order mark, soft hyphen,
  tags; also the prepended concatenation marks such as U+0600, which draw only over the digits that follow), and
  Zs, Zl, Zp separators (every whitespace character is Cc, Zs, Zl or Zp): invisible.
- Cs surrogates: invisible. A lone surrogate (JSON carries one as a "\\ud800" escape) is no character: UTF-8
  cannot encode it, and the tokenizer reads it as U+FFFD.
- Cn unassigned: visible, since a newer Unicode than this Python's may have assigned it (a new emoji) and a
  renderer shows a box; except the 66 noncharacters (U+FDD0..U+FDEF and the last two of each plane, e.g. U+FFFF),
  never assigned and not for interchange, and those reserved as default ignorable (below): invisible.
- Co private use: visible: fonts give them glyphs (icon fonts, U+F8FF) that sender and reader agree on.
- Mn and Me combining marks, even alone: visible (a mark without a base still draws, on a dotted circle), except
  the default ignorable ones (variation selectors, the combining grapheme joiner, Mongolian free variation
  selectors): invisible.
- Every other category (letters, Mc marks, numbers, punctuation, symbols): visible, except the default ignorable
  Hangul fillers (Lo) and the braille blank U+2800 (So), which draw nothing.

Default ignorable: Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt), the code points a renderer
shows as nothing, assigned or not.
"""

import functools
import sys
import unicodedata

NO_VISIBLE_CHARACTERS = "has no visible characters (only whitespace or invisible format characters)"
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
# Default_Ignorable_Code_Point, Unicode 15.1, as inclusive [first, last] code point ranges
_DEFAULT_IGNORABLE = tuple(
    range(first, last + 1)
    for first, last in (
        (0x00AD, 0x00AD),
        (0x034F, 0x034F),
        (0x061C, 0x061C),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x180B, 0x180F),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x206F),
        (0x3164, 0x3164),
        (0xFE00, 0xFE0F),
        (0xFEFF, 0xFEFF),
        (0xFFA0, 0xFFA0),
        (0xFFF0, 0xFFF8),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0000, 0xE0FFF),
    )
)
_NONCHARACTERS = frozenset(range(0xFDD0, 0xFDF0)) | {
    plane + last for plane in range(0, 0x110000, 0x10000) for last in (0xFFFE, 0xFFFF)
}
_BRAILLE_BLANK = 0x2800


def _invisible(char: str) -> bool:
    """Whether one character shows nothing, by the module's rule."""
    code = ord(char)
    return (
        unicodedata.category(char) in INVISIBLE_CATEGORIES
        or code in _NONCHARACTERS
        or code == _BRAILLE_BLANK
        or any(code in ignorable for ignorable in _DEFAULT_IGNORABLE)
    )


def has_visible_characters(text: str) -> bool:
    """Whether `text` has at least one character that shows: the one rule for an empty text, by which training
    refuses a row and serving a text (e.g. " ", "\\n\\t ", "\\u200b", "\\u3000", "\\ud800", "\\uffff" have none)."""
    stripped = text.strip()
    if stripped and not _invisible(stripped[0]):  # the common case, at once
        return True
    return not all(map(_invisible, set(stripped)))  # distinct characters: few, however long the text


@functools.cache
def visible_character_pattern() -> str:
    """A regular expression that a text contains (re.search; JSON Schema's `pattern`) exactly when
    has_visible_characters(text): a class of every visible character, read alike by Python's and ECMAScript's (with
    the u flag) regular expressions: BMP code points as \\uXXXX escapes, the others as themselves. A class of the
    visible rather than a negated one of the invisible, so that it names no surrogate: validators whose engines read
    UTF-8 (jsonschema-rs, Rust's regex) refuse a pattern with a surrogate escape. Built once, by asking every code
    point's category (about 1 s)."""
    by_category = (c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in INVISIBLE_CATEGORIES)
    invisible = {*by_category, *_NONCHARACTERS, _BRAILLE_BLANK}.union(*_DEFAULT_IGNORABLE)
    ranges = []  # [first, last] of each run of consecutive visible code points
    for code in range(sys.maxunicode + 1):
        if code in invisible:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])

    def char(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    return "[" + "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges) + "]"


def near_duplicate_key(text: str) -> str:
    """What two texts that read the same share: Unicode NFKC, case folded, format characters dropped and every
    run of whitespace one space, trimmed. "FREE  prize" and "free prize\\n" share a key."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    if not folded.isascii():  # ASCII has no format characters: most texts skip the walk
        folded = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    return " ".join(folded.split())
