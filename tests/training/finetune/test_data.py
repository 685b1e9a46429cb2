import csv
import gzip
import hashlib
import json
from collections import Counter

import pytest

from training.finetune import data
from training.finetune.data import (
    Dataset,
    Duplicates,
    balance,
    deduplicate,
    deduplicate_counted,
    fingerprint,
    load_dataset,
    load_sms_spam,
    load_table,
    partition,
    select_split,
    stratified_split,
    text_id,
    write_split,
)
from training.runtime.text import near_duplicate_key

# Messages that CSV quoting or a naive split would mangle: quotes, commas, tabs, a lone quote.
SMS_ROWS = [
    ("ham", 'He said "see you at 5" and left'),
    ("spam", "WINNER!! Claim your prize, call 0800 now"),
    ("ham", '"Quoted from start to end"'),
    ("ham", 'Unbalanced "quote here'),
    ("spam", "tab\tinside the text"),
    ("ham", "  leading and trailing spaces  "),
]


def write_sms(path, rows=SMS_ROWS, newline="\n"):
    path.write_bytes("".join(f"{label}\t{text}{newline}" for label, text in rows).encode())
    return path


def labelled(pairs: str) -> Dataset:
    """'a:x b:y' -> texts [a, b], labels [x, y]."""
    rows = [pair.split(":") for pair in pairs.split()]
    return Dataset([text for text, _ in rows], [label for _, label in rows])


# --- Tables ---------------------------------------------------------------------------------------

TABLE_ROWS = [
    {"message": 'Free entry, "now"', "category": "spam", "extra": "1"},
    {"message": "Two\nlines, one message", "category": "ham", "extra": "2"},
    {"message": "ok", "category": "ham", "extra": "3"},
]


def write_table(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_load_table_reads_custom_columns(tmp_path, suffix):
    path = write_table(tmp_path / f"messages{suffix}", TABLE_ROWS)
    ds = load_table(path, text_column="message", label_column="category")
    assert ds.texts == [row["message"] for row in TABLE_ROWS]
    assert ds.labels == [row["category"] for row in TABLE_ROWS]
    assert ds.label_names() == ["ham", "spam"]


def test_load_table_default_columns_and_dispatch(tmp_path):
    rows = [{"label": label, "text": text} for label, text in SMS_ROWS]
    path = write_table(tmp_path / "data.csv", rows)
    assert load_dataset(str(path)) == load_table(path) == Dataset([t for _, t in SMS_ROWS], [la for la, _ in SMS_ROWS])


def test_labels_are_stripped_of_surrounding_whitespace(tmp_path):
    """60 ham, 45 'spam' and 15 'spam ' are two labels, 60 and 60: not three."""
    rows = [("ham", f"hello {i}") for i in range(60)] + [("spam", f"win {i}") for i in range(45)]
    rows += [("spam ", f"prize {i}") for i in range(15)]
    path = write_table(tmp_path / "data.csv", [{"text": text, "label": label} for label, text in rows])
    ds = load_table(path)
    assert Counter(ds.labels) == {"ham": 60, "spam": 60}
    assert ds.label_names() == ["ham", "spam"]
    assert Counter(balance(ds, seed=0).labels) == {"ham": 60, "spam": 60}


def test_a_row_with_a_surplus_field_never_becomes_a_label(tmp_path):
    """The unquoted comma that used to turn ' win a cash prize now' into a fourth label."""
    path = tmp_path / "data.csv"
    path.write_text("text,label\nhi,ham\nFree entry, win a cash prize now,spam\n")
    with pytest.raises(ValueError, match=r"line 3: 3 fields, too many"):
        load_table(path)
    path.write_text('text,label\nhi,ham\n"Free entry, win a cash prize now",spam\n\n')  # quoted: fine
    assert load_table(path) == Dataset(["hi", "Free entry, win a cash prize now"], ["ham", "spam"])


def test_load_table_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhello,ham\nwin,spam\n")
    assert load_table(path).texts == ["hello", "win"]


def test_load_table_error_names_the_line_of_a_multiline_record(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"one\ntwo\nthree",ham\nwin,spam\nbad,\n')
    with pytest.raises(ValueError, match=r"data\.csv, line 6: label must be a non-empty string, got ''"):
        load_table(path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        pytest.param("a.csv", "", r"a\.csv: no rows", id="empty-csv"),
        pytest.param("a.csv", "text,label\n", r"a\.csv: no rows", id="header-only"),
        pytest.param("a.jsonl", "\n\n", r"a\.jsonl: no rows", id="empty-jsonl"),
        pytest.param(
            "a.csv",
            "body,label\nhi,ham\n",
            r"a\.csv, line 2: no column 'text'; the row has \['body'",
            id="csv-no-text-column",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"text": "yo"}\n',
            r"a\.jsonl, line 2: no column 'label'",
            id="jsonl-no-label",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\nyo,ham\n",
            r"a\.csv: a classifier needs at least 2 labels, found only \['ham'\]",
            id="one-label",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"text": "yo", "label": 1}\n',
            r"a\.jsonl, line 2: label must be a non-empty string, got 1",
            id="int-label",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": null}\n',
            r"line 1: label must be a non-empty string, got None",
            id="null-label",
        ),
        pytest.param(
            "a.tsv",
            "text\tlabel\nhi\t  \n",
            r"a\.tsv, line 2: label must be a non-empty string, got '  '",
            id="blank-label",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\nwin\n",
            r"a\.csv, line 3: 1 fields, too few for the header's 2 \['text', 'label'\] .*: \['win'\]",
            id="short-row",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\nFree entry, win a cash prize now,spam\n",
            r"a\.csv, line 3: 3 fields, too many for the header's 2 \['text', 'label'\] \(quote a field that holds "
            r"the delimiter\): \['Free entry', ' win a cash prize now', 'spam'\]",
            id="unquoted-comma",
        ),
        pytest.param(
            "a.tsv",
            "text\tlabel\nhi\tham\nwin\tnow\tspam\n",
            r"a\.tsv, line 3: 3 fields, too many for the header's 2",
            id="tsv-unquoted-tab",
        ),
        pytest.param(
            "a.tsv",
            "text\tlabel\nhi\tham\nwin\n",
            r"a\.tsv, line 3: 1 fields, too few for the header's 2",
            id="tsv-short",
        ),
        pytest.param(
            "a.csv",
            'text,label\n"one\ntwo",ham\nthree,ham,x\n',
            r"a\.csv, line 4: 3 fields, too many",
            id="after-multiline-record",
        ),
        pytest.param(
            "a.csv",
            "text,text,label\nhi,yo,ham\n",
            r"a\.csv, line 1: the header names column 'text' more than once",
            id="repeated-column",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"label": "spam"}\n',
            r"a\.jsonl, line 2: no column 'text'; the row has \['label'\]",
            id="jsonl-no-text",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\nyo,Ham\nwin,spam\n",
            r"a\.csv: labels 'ham' \(line 2\) and 'Ham' \(line 3\) differ only by case",
            id="labels-differ-by-case",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,SPAM \nyo,ham\nwin,spam\n",
            r"a\.csv: labels 'SPAM' \(line 2\) and 'spam' \(line 4\) differ only by case",
            id="labels-differ-by-case-after-stripping",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,spam\nyo,ham\nwin,\u0455pam\n",
            r"a\.csv: labels 'spam' \(line 2\) and '\u0455pam' \(line 4\) differ by look-alike letters \('\u0455' "
            r"U\+0455 CYRILLIC SMALL LETTER DZE\); write them the same way",
            id="labels-differ-by-a-cyrillic-look-alike",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,\u0405PAM\nyo,ham\nwin,spam\n",
            r"labels '\u0405PAM' \(line 2\) and 'spam' \(line 4\) differ by look-alike letters",
            id="labels-differ-by-case-and-a-look-alike",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,\u039d\u039f\nyo,ham\nwin,no\n",
            r"labels '\u039d\u039f' \(line 2\) and 'no' \(line 4\) differ by look-alike letters \('\u039d' U\+039D "
            r"GREEK CAPITAL LETTER NU, '\u039f' U\+039F GREEK CAPITAL LETTER OMICRON\)",
            id="labels-differ-by-greek-look-alikes",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,\uff53\uff50\uff41\uff4d\nyo,ham\nwin,spam\n",
            r"labels '\uff53\uff50\uff41\uff4d' \(line 2\) and 'spam' \(line 4\) differ by look-alike letters",
            id="labels-differ-by-full-width-letters",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\n" + "x" * 131_073 + ",spam\n",
            r"a\.csv, line 3: not a CSV record this reader takes \(field larger than field limit \(131072\)\); a "
            r"text may hold at most 131,072 characters",
            id="csv-field-over-the-limit",
        ),
        pytest.param(
            "a.tsv",
            'text\tlabel\nhi\tham\n"one\n' + "x" * 131_073 + '"\tspam\n',
            r"a\.tsv, line 3: not a CSV record this reader takes \(field larger than field limit",
            id="tsv-multiline-field-over-the-limit",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"text": "' + "x" * 131_073 + '", "label": "spam"}\n',
            r"a\.jsonl, line 2: text of 131,073 characters, longer than the 131,072 a text may hold: 'xxx",
            id="jsonl-text-over-the-limit",
        ),
        pytest.param(
            "a.csv",
            "text,label\nhi,ham\n\u200b,spam\n",
            r"a\.csv, line 3: text has no visible characters .*'\\u200b'",
            id="zero-width-space",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"text": "\\n\\t ", "label": "spam"}\n',
            r"a\.jsonl, line 2: text has no visible characters \(only whitespace or invisible format characters\), "
            r"got '\\n\\t '",
            id="whitespace",
        ),
        pytest.param(
            "a.tsv",
            "text\tlabel\nhi\tham\n\u3000\tspam\n",
            r"a\.tsv, line 3: text has no visible",
            id="ideographic-space",
        ),
        pytest.param(
            "a.csv", "text,label\n,ham\n", r"a\.csv, line 2: text must be a non-empty string, got ''", id="empty-text"
        ),
        pytest.param(
            "a.jsonl",
            '{"text": ["x"], "label": "ham"}\n',
            r"line 1: text must be a non-empty string, got \['x'\]",
            id="list-text",
        ),
        pytest.param(
            "a.jsonl",
            '{"text": "hi", "label": "ham"}\n{"text": "hi",\n',
            r"a\.jsonl, line 2: not JSON",
            id="broken-json",
        ),
        pytest.param("a.jsonl", '["hi", "ham"]\n', r"a\.jsonl, line 1: expected a JSON object", id="json-array"),
        pytest.param("a.xlsx", "text,label\n", r"a\.xlsx: unknown table format '\.xlsx'", id="unknown-suffix"),
    ],
)
def test_load_table_refuses(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_table(path)


def test_a_text_of_the_limit_is_read_whole(tmp_path):
    """131,072 characters, the most predict scores, in a field csv reads at its default limit."""
    path = tmp_path / "a.csv"
    path.write_text("text,label\nhi,ham\n" + "x" * 131_072 + ",spam\n", encoding="utf-8")
    assert [len(text) for text in load_table(path).texts] == [2, 131_072]


def test_an_sms_line_over_the_limit_is_refused_by_line(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_text("ham\thi\nspam\t" + "x" * 131_073 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"SMSSpamCollection, line 2: text of 131,073 characters, longer than"):
        load_sms_spam(path)


def test_load_table_refuses_non_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé,ham\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8 text"):
        load_table(path)


# --- SMS Spam Collection --------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_load_sms_spam_reads_plain_tab_lines(tmp_path, newline):
    ds = load_sms_spam(write_sms(tmp_path / "SMSSpamCollection", newline=newline))
    assert ds.texts == [text for _, text in SMS_ROWS]  # quotes, inner tabs and spaces kept verbatim
    assert ds.labels == [label for label, _ in SMS_ROWS]


def test_load_dataset_sends_a_file_named_smsspamcollection_to_the_sms_parser(tmp_path):
    path = write_sms(tmp_path / "SMSSpamCollection")
    assert load_dataset(str(path)) == load_sms_spam(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(
            "ham\tok\nspam no tab here\n", r"line 2: expected 'label<TAB>text', got 'spam no tab here'", id="no-tab"
        ),
        pytest.param("ham\tok\n\nspam\twin\n", r"line 2: expected 'label<TAB>text', got ''", id="blank-line"),
        pytest.param("ham\tok\n\twin\n", r"line 2: label must be a non-empty string, got ''", id="no-label"),
        pytest.param("ham\tok\nspam\t\n", r"line 2: text must be a non-empty string, got ''", id="no-text"),
        pytest.param("ham\tok\nspam\t \n", r"line 2: text has no visible characters", id="blank-text"),
        pytest.param("ham\tok\nHam\twin\n", r"labels 'ham' \(line 1\) and 'Ham' \(line 2\) differ only", id="case"),
        pytest.param("ham\tok\nham\tfine\n", r"at least 2 labels, found only \['ham'\]", id="one-label"),
        pytest.param("", r"SMSSpamCollection: no rows", id="empty"),
    ],
)
def test_load_sms_spam_refuses_malformed_lines(tmp_path, content, match):
    path = tmp_path / "SMSSpamCollection"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_sms_spam(path)


def test_sms_comes_from_the_package_without_the_network(no_network):
    ds = load_dataset("sms")
    assert fingerprint(ds)["rows"] == 5574
    assert Counter(ds.labels) == {"ham": 4827, "spam": 747}
    assert deduplicate_counted(ds)[1] == Duplicates(exact=403, near=12)


def test_the_packaged_sms_is_the_shared_file(shared_data):
    assert (
        gzip.decompress(data.PACKAGED_SMS.read_bytes())
        == (shared_data / "sms-spam-collection" / "SMSSpamCollection").read_bytes()
    )


@pytest.mark.parametrize(
    ("packaged", "match"),
    [
        pytest.param(
            gzip.compress(b"ham\tok\nspam\twin\n"),
            r"SMSSpamCollection\.gz: decompressed, its sha256 is 7fdfcfe9e52d[0-9a-f]{52}, "
            r"expected 7d039a24a6083ed9ef0f[0-9a-f]{44}",
            id="other-content",
        ),
        pytest.param(b"ham\tok\n", r"SMSSpamCollection\.gz: not a readable gzip file", id="not-gzip"),
        pytest.param(gzip.compress(b"ham\tok\n" * 100)[:-30], r"not a readable gzip file", id="truncated"),
    ],
)
def test_a_changed_packaged_sms_is_refused_naming_the_file_and_both_hashes(tmp_path, monkeypatch, packaged, match):
    path = tmp_path / "SMSSpamCollection.gz"
    path.write_bytes(packaged)
    monkeypatch.setattr(data, "PACKAGED_SMS", path)
    with pytest.raises(ValueError, match=match):
        load_dataset("sms")


def test_real_sms_spam_collection(shared_data):
    ds = load_sms_spam(shared_data / "sms-spam-collection" / "SMSSpamCollection")
    assert fingerprint(ds)["rows"] == 5574
    assert Counter(ds.labels) == {"ham": 4827, "spam": 747}
    assert ds.label_names() == ["ham", "spam"]
    assert len(set(ds.texts)) == 5171
    unique, dropped = deduplicate_counted(ds)
    assert dropped == Duplicates(exact=403, near=12)
    assert len(unique.texts) == len({near_duplicate_key(text) for text in ds.texts}) == 5159
    assert Counter(unique.labels) == {"ham": 4517, "spam": 642}


# --- Preparing ------------------------------------------------------------------------------------


def test_deduplicate_keeps_the_first_occurrence_and_its_label():
    ds = labelled("a:ham b:spam a:ham c:ham b:ham d:spam")
    assert deduplicate(ds) == labelled("a:ham b:spam c:ham d:spam")


@pytest.mark.parametrize(
    ("first", "variant"),
    [
        pytest.param("Free prize now", "FREE PRIZE NOW", id="case"),
        pytest.param("Free prize now", "  Free\tprize \n now ", id="whitespace"),
        pytest.param("Free prize now", "Ｆｒｅｅ　prize now", id="fullwidth"),
        pytest.param("Free prize now", "Free pri\u200bze now", id="zero-width-space"),
        pytest.param("Straße", "STRASSE", id="casefold"),
        pytest.param("caf\u00e9", "cafe\u0301", id="composed-accent"),
    ],
)
def test_near_duplicates_share_a_key(first, variant):
    assert near_duplicate_key(first) == near_duplicate_key(variant)
    assert deduplicate_counted(Dataset([first, variant, first], ["spam", "ham", "spam"])) == (
        Dataset([first], ["spam"]),
        Duplicates(exact=1, near=1),
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param("Free prize now", "Free prize now!", id="punctuation"),
        pytest.param("call 0800", "call 0900", id="digits"),
        pytest.param("cafe", "café", id="accent"),
    ],
)
def test_texts_that_read_differently_are_kept(one, other):
    assert near_duplicate_key(one) != near_duplicate_key(other)
    assert deduplicate_counted(Dataset([one, other], ["ham", "ham"]))[1] == Duplicates(exact=0, near=0)


def test_near_duplicates_never_cross_splits():
    """Spam variants repeated in case and spacing: after deduplication no normalised text is in two splits."""
    texts, labels = [], []
    for i in range(40):
        for variant in (f"WIN a prize {i} now", f"win a PRIZE {i}  now", f" Win a prize {i} now\n"):
            texts.append(variant)
            labels.append("spam")
        texts.append(f"see you at {i}")
        labels.append("ham")
    unique, dropped = deduplicate_counted(Dataset(texts, labels))
    assert dropped == Duplicates(exact=0, near=80)
    split = stratified_split(unique, seed=0)
    keys = [{near_duplicate_key(text) for text in part.texts} for part in (split.train, split.validation, split.test)]
    assert sum(map(len, keys)) == len(set.union(*keys)) == 80


def many(n_ham: int, n_spam: int) -> Dataset:
    return Dataset(
        [f"ham {i}" for i in range(n_ham)] + [f"spam {i}" for i in range(n_spam)], ["ham"] * n_ham + ["spam"] * n_spam
    )


def test_stratified_split_partitions_and_keeps_proportions():
    ds = many(700, 100)
    split = stratified_split(ds, seed=0)
    parts = (split.train, split.validation, split.test)
    assert [Counter(part.labels) for part in parts] == [
        {"ham": 490, "spam": 70},
        {"ham": 70, "spam": 10},
        {"ham": 140, "spam": 20},
    ]
    texts = [set(part.texts) for part in parts]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert texts[0] | texts[1] | texts[2] == set(ds.texts)
    for part in parts:  # every text keeps its label
        assert all(text.split()[0] == label for text, label in zip(part.texts, part.labels, strict=True))


def test_stratified_split_is_seeded():
    ds = many(50, 20)
    assert stratified_split(ds, seed=1) == stratified_split(ds, seed=1)
    assert stratified_split(ds, seed=1).test != stratified_split(ds, seed=2).test


@pytest.mark.parametrize(
    "fractions", [(0.8, 0.2), (0.7, 0.2, 0.2), (0.9, 0.1, 0.0), (1.2, -0.1, -0.1)], ids=["two", "sum", "zero", "neg"]
)
def test_stratified_split_refuses_bad_fractions(fractions):
    with pytest.raises(ValueError, match=r"fractions must be three positive numbers that sum to 1"):
        stratified_split(many(10, 10), seed=0, fractions=fractions)


def test_stratified_split_refuses_too_few_rows():
    with pytest.raises(ValueError, match=r"2 rows are too few to split"):
        stratified_split(many(1, 1), seed=0)


def test_balance_undersamples_to_the_smallest_label():
    ds = Dataset([f"t{i}" for i in range(60)], ["a"] * 30 + ["b"] * 20 + ["c"] * 10)
    balanced = balance(ds, seed=0)
    assert Counter(balanced.labels) == {"a": 10, "b": 10, "c": 10}
    positions = [ds.texts.index(text) for text in balanced.texts]
    assert positions == sorted(positions)  # a subset of the original rows, in their order
    assert all(ds.labels[p] == label for p, label in zip(positions, balanced.labels, strict=True))
    assert balance(ds, seed=0) == balanced
    assert balance(ds, seed=1) != balanced


def test_partition_by_undersampling_holds_out_the_rows_it_leaves():
    ds = many(1000, 100)
    parts = partition(ds, seed=0, balancing="undersample")
    # the balanced 100 + 100 split 70 / 10 / 20; the 900 ham left out split 630 / 90 / 180 the same way
    assert Counter(parts.train.labels) == {"ham": 70, "spam": 70}
    assert Counter(parts.validation.labels) == {"ham": 10, "spam": 10}
    assert Counter(parts.test.labels) == {"ham": 20, "spam": 20}
    assert Counter(parts.selection.labels) == {"ham": 10 + 630 + 90, "spam": 10}
    assert Counter(parts.evaluation.labels) == {"ham": 20 + 180, "spam": 20}
    train, selection, evaluation = (set(getattr(parts, n).texts) for n in ("train", "selection", "evaluation"))
    assert not (train & selection or train & evaluation or selection & evaluation)
    assert train | selection | evaluation == set(ds.texts)  # every row has a role
    assert set(parts.validation.texts) <= selection and set(parts.test.texts) <= evaluation


@pytest.mark.parametrize("balancing", ["class-weighted", "none"])
def test_partition_of_all_rows_trains_on_the_left_out_rows_and_evaluates_on_the_same_rows(balancing):
    ds = many(1000, 100)
    parts, undersampled = partition(ds, 0, balancing), partition(ds, 0, "undersample")
    assert Counter(parts.train.labels) == {"ham": 70 + 630, "spam": 70}
    assert parts.selection == parts.validation and Counter(parts.validation.labels) == {"ham": 100, "spam": 10}
    assert parts.evaluation == undersampled.evaluation and parts.test == undersampled.test
    train, selection, evaluation = (set(getattr(parts, n).texts) for n in ("train", "selection", "evaluation"))
    assert not (train & selection or train & evaluation or selection & evaluation)
    assert train | selection | evaluation == set(ds.texts)


def test_partition_refuses_an_unknown_balancing():
    with pytest.raises(ValueError, match=r"balancing must be one of .*got 'oversample'"):
        partition(many(100, 10), 0, "oversample")


def test_split_file_selects_each_role(tmp_path):
    ds = many(200, 20)
    parts = partition(ds, 0, "undersample")
    write_split(tmp_path / "split.json", parts)
    for role in ("train", "validation", "test", "selection", "evaluation"):
        selected, expected = select_split(ds, tmp_path / "split.json", role), getattr(parts, role)
        pairs = [sorted(zip(d.texts, d.labels, strict=True)) for d in (selected, expected)]
        assert pairs[0] == pairs[1]
    (tmp_path / "old.json").write_text(json.dumps({"train": [], "validation": [], "test": []}))
    with pytest.raises(ValueError, match=r"records no 'evaluation' rows"):
        select_split(ds, tmp_path / "old.json", "evaluation")
    with pytest.raises(ValueError, match=r"gone\.json: missing, so --split test cannot be selected$"):
        select_split(ds, tmp_path / "gone.json", "test")
    (tmp_path / "dir" / "split.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"split\.json: not a regular file, so --split test cannot be selected$"):
        select_split(ds, tmp_path / "dir" / "split.json", "test")


def test_fingerprint_covers_texts_labels_and_order():
    ds = labelled("a:ham b:spam c:ham")
    fp = fingerprint(ds)
    assert fp["rows"] == 3
    assert fp["labels"] == {"ham": 2, "spam": 1}
    assert fingerprint(labelled("a:ham b:spam c:ham")) == fp
    for other in (labelled("b:spam a:ham c:ham"), labelled("a:ham b:spam c:spam"), labelled("a:ham b:spam")):
        assert fingerprint(other)["sha256"] != fp["sha256"]
    # a tab inside a text is not a field separator
    assert fingerprint(Dataset(["a\tb"], ["c"]))["sha256"] != fingerprint(Dataset(["a"], ["b\tc"]))["sha256"]


def test_text_id():
    assert text_id("hello") == text_id("hello") == hashlib.sha256(b"hello").hexdigest()[:16]
    assert text_id("hello") != text_id("hello ")
    assert len(text_id("\ud800 lone surrogate, as JSON can carry")) == 16


def test_dataset_refuses_unequal_lengths():
    with pytest.raises(ValueError, match=r"2 texts but 1 labels"):
        Dataset(["a", "b"], ["ham"])
