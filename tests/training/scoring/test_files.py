"""`python -m training predict`: every input and output format, the same results as POST /classify, bad rows
reported by line, resume after a crash, streaming in chunks."""

import csv
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import calibrated_checkpoint, edit_tensors, tiny_card, tiny_settings
from training.cli import main
from training.finetune.data import load_sms_spam
from training.runtime.checkpoint import save_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.inference import Threshold
from training.runtime.model import GPTClassifier
from training.scoring.files import MAX_ROW_CHARS
from training.scoring.records import result_columns, result_record

TEXTS = [
    "WINNER!! Claim your free prize now",
    "See you at 5?",
    "a message\nthat spans two lines, with a comma",
    "a text that holds <|endoftext|> as plain text",
    "naïve café — ünïcödé ✓ 😀",
    "the weather " * 40,  # longer than the tiny card's 48 tokens: truncated
    'quotes " and \t tabs',
]


@pytest.fixture(params=[None, Threshold("spam", 0.3)], ids=["argmax", "threshold"])
def checkpoint(request, tmp_path, tiny_config, bpe_dir) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", GPTClassifier(tiny_config), bpe_dir, tiny_card(threshold=request.param))


def classify(checkpoint: Path, texts: list[str], **settings) -> list[dict]:
    """What the server answers for `texts`."""
    with TestClient(create_app(tiny_settings(checkpoint, **settings))) as client:
        # ASCII JSON: a lone surrogate travels as its \u escape, as a client's JSON encoder would send it
        body = json.dumps({"texts": texts})
        response = client.post("/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def predict(*argv: str) -> int:
    return main(["predict", "--device", "cpu", "--no-progress", *map(str, argv)])


def write_input(path: Path, texts: list[str]) -> Path:
    """`texts` in the format the suffix names, with an id column beside the text where the format has columns."""
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow(["id", "text"])
            writer.writerows([i, text] for i, text in enumerate(texts))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts)))
    else:
        path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


def assert_results_equal(rows: list[dict], expected: list[dict], labels=("ham", "spam"), prefix: str = "") -> None:
    """Output rows (CSV strings or JSON values) against /classify's results, probabilities to 1e-6."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert row[prefix + "label"] == want["label"]
        for label in labels:
            assert float(row[f"{prefix}probability_{label}"]) == pytest.approx(want["probabilities"][label], abs=1e-6)
        assert int(row[prefix + "tokens"]) == want["tokens"]
        assert str(row[prefix + "truncated"]).lower() == str(want["truncated"]).lower()


@pytest.mark.parametrize("source", ["in.csv", "in.tsv", "in.jsonl", "in.txt"])
@pytest.mark.parametrize("target", ["out.csv", "out.jsonl"])
def test_every_format_gives_what_classify_answers(checkpoint, tmp_path, source, target):
    texts = TEXTS if source != "in.txt" else [t for t in TEXTS if "\n" not in t]  # a plain line holds no line break
    data, out = write_input(tmp_path / source, texts), tmp_path / target
    assert predict("--checkpoint", checkpoint, "--data", data, "--out", out) == 0
    rows = read_output(out)
    assert_results_equal(rows, classify(checkpoint, texts))
    assert [row["text"] for row in rows] == texts  # the input's columns come through, in input order
    if source != "in.txt":
        assert [str(row["id"]) for row in rows] == [str(i) for i in range(len(texts))]
    assert any(str(row["truncated"]).lower() == "true" for row in rows)
    if target == "out.csv":
        assert list(rows[0]) == [
            *(["id"] if source != "in.txt" else []), "text", "line", "label", "probability_ham", "probability_spam",
            "tokens", "truncated",
        ]  # fmt: skip


def test_classify_and_file_scoring_build_their_answers_with_one_function(checkpoint, tmp_path, monkeypatch):
    """/classify and `predict` both turn logits into answers with Classifier.predictions, so they agree by
    construction: the same Predictions (probabilities compared exactly: one request and one chunk run the same
    forward pass), and each one's output is those Predictions as it is."""
    made = []
    predictions = Classifier.predictions

    def recording(self, rows, truncated, logits):
        made.append(predictions(self, rows, truncated, logits))
        return made[-1]

    monkeypatch.setattr(Classifier, "predictions", recording)
    served = classify(checkpoint, TEXTS)
    data, out = write_input(tmp_path / "in.jsonl", TEXTS), tmp_path / "out.jsonl"
    assert predict("--checkpoint", checkpoint, "--data", data, "--out", out) == 0
    assert len(made) == 2  # one call each: /classify's request, then predict's one chunk
    by_classify, by_predict = made
    assert by_classify == by_predict  # dataclass equality: every probability bit for bit
    assert served == [asdict(p) for p in by_classify]  # JSON floats read back to the same doubles
    columns = result_columns(("ham", "spam"))
    assert [{k: row[k] for k in columns} for row in read_output(out)] == [result_record(p) for p in by_predict]


def test_int8_gives_what_the_int8_server_answers(tmp_path, tiny_checkpoint):
    data, out = write_input(tmp_path / "in.csv", TEXTS), tmp_path / "out.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out, "--quantize-int8") == 0
    served = classify(tiny_checkpoint, TEXTS, quantize_int8=True)
    assert_results_equal(read_output(out), served)
    float32 = classify(tiny_checkpoint, TEXTS)
    assert any(  # int8 really ran: some probability moved
        abs(a["probabilities"]["spam"] - b["probabilities"]["spam"]) > 1e-6
        for a, b in zip(served, float32, strict=True)
    )


def test_bad_rows_are_reported_by_line_and_the_run_goes_on(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "in.csv"
    data.write_bytes(
        b"id,text\n"
        b"1,hello there\n"  # line 2
        b'2,"a quoted\nline break"\n'  # lines 3-4
        b"3\n"  # line 5: one field
        b"4,   \n"  # line 6: nothing but spaces
        b"5,\xff\xfe not utf-8\n"  # line 7
        b"6,too,many\n"  # line 8
        b"\n"  # line 9: blank, skipped
        b"7,win a prize\n"  # line 10
    )
    out = tmp_path / "out.jsonl"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    rows = read_output(out)
    assert [(row["id"], row["line"]) for row in rows] == [("1", 2), ("2", 3), ("7", 10)]
    bad = [json.loads(line) for line in Path(f"{out}.bad-rows.jsonl").read_text().splitlines()]
    assert [b["line"] for b in bad] == [5, 6, 7, 8]
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["rows_written"], summary["rows_scored"], summary["bad_rows"]) == (3, 3, 4)
    err = capsys.readouterr()
    for line in (5, 6, 7, 8):
        assert f"line {line}:" in err.err
    assert "4 bad rows" in err.out


@pytest.mark.parametrize(
    ("content", "bad_lines"),
    [
        pytest.param(
            '{"text": "fine"}\n{"text": \n[1, 2]\n{"other": "x"}\n{"text": 3}\n\n{"text": ""}\n{"text": "ok"}\n',
            [2, 3, 4, 5, 7],
            id="jsonl",
        ),
        pytest.param("fine\n\n   \nok\n", [2, 3], id="lines"),
    ],
)
def test_bad_rows_in_jsonl_and_plain_lines(tmp_path, tiny_checkpoint, content, bad_lines):
    data = tmp_path / ("in.jsonl" if "{" in content else "in.txt")
    data.write_text(content)
    out = tmp_path / "out.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    assert [row["text"] for row in read_output(out)] == ["fine", "ok"]
    assert [json.loads(b)["line"] for b in Path(f"{out}.bad-rows.jsonl").read_text().splitlines()] == bad_lines


@pytest.mark.parametrize("target", ["out.csv", "out.jsonl"])
def test_a_rerun_after_a_crash_resumes_where_the_output_stops(tmp_path, tiny_checkpoint, target):
    texts = [f"message number {i}, with a comma" + ("\nand a second line" if i % 3 == 0 else "") for i in range(40)]
    texts[5] = "   "  # bad rows early and late, so some lie before the cut and some after
    data = write_input(tmp_path / "in.csv", texts)
    with open(data, "a") as f:
        f.write("bad,row,here\n41,   \n")
    full = tmp_path / ("full" + Path(target).suffix)
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", full, "--chunk-rows", "8") == 0
    whole = full.read_bytes()

    out = tmp_path / target
    out.write_bytes(whole[: len(whole) * 3 // 5])  # killed mid-write: the last row is cut short
    Path(f"{out}.summary.json").write_bytes(Path(f"{full}.summary.json").read_bytes())  # with its record of the run
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out, "--chunk-rows", "8") == 0
    resumed, expected = read_output(out), read_output(full)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert 0 < summary["rows_kept_from_earlier_run"] < len(expected)
    assert summary["rows_scored"] == len(expected) - summary["rows_kept_from_earlier_run"]
    assert [r["line"] for r in resumed] == [r["line"] for r in expected]  # none twice, none missing, in order
    assert_results_equal(resumed, [_as_result(r) for r in expected])
    assert summary["bad_rows"] == json.loads(Path(f"{full}.summary.json").read_text())["bad_rows"] == 3
    assert Path(f"{out}.bad-rows.jsonl").read_text() == Path(f"{full}.bad-rows.jsonl").read_text()

    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0  # complete: nothing to do
    assert json.loads(Path(f"{out}.summary.json").read_text())["rows_scored"] == 0
    assert read_output(out) == resumed


def _as_result(row: dict) -> dict:
    labels = ("ham", "spam")
    probabilities = {label: float(row[f"probability_{label}"]) for label in labels}
    return {"label": row["label"], "probabilities": probabilities, "tokens": int(row["tokens"]),
            "truncated": str(row["truncated"]).lower() == "true"}  # fmt: skip


def test_no_resume_starts_over(tmp_path, tiny_checkpoint):
    data, out = write_input(tmp_path / "in.csv", TEXTS), tmp_path / "out.csv"
    out.write_text("whatever was here\n")
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out, "--no-resume") == 0
    assert len(read_output(out)) == len(TEXTS)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("out.csv", "name,score\nalice,3\n", id="csv-without-line"),
        pytest.param("out.jsonl", '{"name": "alice"}\n{"name": "bob"}\n', id="jsonl-without-line"),
    ],
)
def test_resume_refuses_a_file_it_did_not_write_and_leaves_it_alone(tmp_path, tiny_checkpoint, capsys, name, content):
    data, out = write_input(tmp_path / "in.csv", TEXTS), tmp_path / name
    out.write_text(content)
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 1
    assert "--no-resume" in capsys.readouterr().err
    assert out.read_text() == content


def test_resume_refuses_results_with_other_columns_and_keeps_their_bad_rows(tmp_path, tiny_checkpoint, capsys):
    first, out = tmp_path / "first.csv", tmp_path / "out.csv"
    first.write_text("id,text\n1,hello\n2,   \n")
    assert predict("--checkpoint", tiny_checkpoint, "--data", first, "--out", out) == 0
    before = {path: path.read_text() for path in (out, Path(f"{out}.bad-rows.jsonl"))}
    other = write_input(tmp_path / "other.txt", ["a plain line"])  # columns: text only
    assert predict("--checkpoint", tiny_checkpoint, "--data", other, "--out", out) == 1
    assert "pass --no-resume" in capsys.readouterr().err
    assert {path: path.read_text() for path in before} == before


def test_result_columns_that_clash_with_the_input_need_a_prefix(tmp_path, tiny_checkpoint, capsys):
    data, out = tmp_path / "in.csv", tmp_path / "out.csv"
    data.write_text("text,label\nwin a prize,spam\nsee you,ham\n")
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 1
    assert "--output-prefix" in capsys.readouterr().err
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out, "--output-prefix", "predicted_") == 0
    rows = read_output(out)
    assert [row["label"] for row in rows] == ["spam", "ham"]  # the input's own column, untouched
    assert_results_equal(rows, classify(tiny_checkpoint, ["win a prize", "see you"]), prefix="predicted_")


def test_rows_are_scored_a_chunk_at_a_time(tmp_path, tiny_checkpoint, monkeypatch):
    sizes = []
    classify = Classifier.classify

    def recording(self, texts):
        sizes.append(len(texts))
        return classify(self, texts)

    monkeypatch.setattr(Classifier, "classify", recording)
    data = write_input(tmp_path / "in.txt", [f"text {i}" for i in range(23)])
    assert (
        predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", tmp_path / "o.csv", "--chunk-rows", "5") == 0
    )
    assert sizes == [5, 5, 5, 5, 3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--dtype", "float16"], "not supported on CPU", id="half-on-cpu"),
        pytest.param(["--out", "results.parquet"], "cannot tell the format", id="unknown-output-suffix"),
        pytest.param(["--chunk-rows", "0"], "error: --chunk-rows must be at least 1", id="zero-chunk"),
        pytest.param(["--batch-size", "0"], "error: --batch-size must be at least 1", id="zero-batch"),
        pytest.param(["--threads", "100000"], "error: --threads must be at most 1024", id="threads-past-any-cpu"),
        pytest.param(
            ["--device", "cuda"],
            "device 'cuda' requested but CUDA is not available",
            id="absent-cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
    ],
)
def test_bad_options_are_refused_before_anything_runs(tmp_path, tiny_checkpoint, capsys, argv, message):
    data = write_input(tmp_path / "in.csv", TEXTS)
    with pytest.raises(SystemExit) as exit_info:
        predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", tmp_path / "out.csv", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_loaded_is_one_error(tmp_path, capsys):
    data = write_input(tmp_path / "in.csv", TEXTS)
    assert predict("--checkpoint", tmp_path / "nowhere", "--data", data, "--out", tmp_path / "out.csv") == 1
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_csv_output_refuses_a_lone_surrogate_that_jsonl_keeps(tmp_path, tiny_checkpoint):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", tmp_path / "out.csv") == 0
    assert [json.loads(b)["line"] for b in (tmp_path / "out.csv.bad-rows.jsonl").read_text().splitlines()] == [2]
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", tmp_path / "out.jsonl") == 0
    rows = read_output(tmp_path / "out.jsonl")
    assert [row["text"] for row in rows] == ["fine", "lone \ud800 surrogate"]
    assert_results_equal(rows, classify(tiny_checkpoint, ["fine", "lone \ud800 surrogate"]))


def test_a_row_the_model_overflows_on_stops_the_run_naming_its_line(tmp_path, tiny_checkpoint, tokenizer, capsys):
    """One token's embedding at 3e38 (finite, so the checkpoint loads): no made-up probability is written for that
    row; the rows scored before its chunk stay written."""
    (z,) = tokenizer.encode_ordinary("z")
    edit_tensors(lambda state: state["transformer.wte.weight"][z].fill_(3e38))(tiny_checkpoint)
    source = write_input(tmp_path / "in.csv", ["hello there", "see you at six", "ok then", "zebra first", "bye"])
    out = tmp_path / "out.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", source, "--out", out, "--chunk-rows", "2") == 1
    assert "lines 5: the model gave non-finite logits" in capsys.readouterr().err
    assert [row["text"] for row in read_output(out)] == ["hello there", "see you at six"]


def test_a_prior_gives_what_the_server_told_it_answers(tmp_path, tiny_config, bpe_dir):
    """--prior and SPAMGPT_PRIOR: the same correction, stated by /info; TEI's raw scores soften to the same."""
    ckpt = calibrated_checkpoint(tmp_path / "ckpt", tiny_config, bpe_dir)
    data, out = write_input(tmp_path / "in.csv", TEXTS), tmp_path / "out.csv"
    assert predict("--checkpoint", ckpt, "--data", data, "--out", out, "--prior", "0.02") == 0
    told = classify(ckpt, TEXTS, prior=0.02)
    assert_results_equal(read_output(out), told)
    default = classify(ckpt, TEXTS)
    assert all(a["probabilities"]["spam"] < b["probabilities"]["spam"] for a, b in zip(told, default, strict=True))
    with TestClient(create_app(tiny_settings(ckpt, prior=0.02))) as client:
        info = client.get("/info").json()
        raw = client.post("/predict", json={"inputs": TEXTS[:2], "raw_scores": True}).json()
    assert info["prior"] == pytest.approx({"spam": 0.02, "ham": 0.98}) and info["calibration"]["temperature"] == 2.0
    assert info["threshold"]["value"] < 0.3  # moved with the prior: the same decisions
    for scores, want in zip(raw, told[:2], strict=True):
        logits = {s["label"]: s["score"] for s in scores}
        p_spam = torch.softmax(torch.tensor([logits["ham"], logits["spam"]]), 0)[1].item()
        assert p_spam == pytest.approx(want["probabilities"]["spam"], abs=1e-6)


def _results_made_by(tmp_path, checkpoint, data: Path, *argv) -> Path:
    """A complete results file of `data`, then cut short as a crash in mid-write leaves it."""
    out = tmp_path / "out.csv"
    assert predict("--checkpoint", checkpoint, "--data", data, "--out", out, "--chunk-rows", "4", *argv) == 0
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) * 3 // 5])
    return out


@pytest.mark.parametrize(
    ("change", "named", "rows"),
    [
        pytest.param("input", "another input", 5, id="another-input"),
        pytest.param("checkpoint", "another checkpoint: its model.safetensors differ", 40, id="another-checkpoint"),
        pytest.param(["--prior", "0.02"], "--prior None then, 0.02 now", 40, id="another-prior"),
        pytest.param(["--quantize-int8"], "--quantize-int8 False then, True now", 40, id="int8"),
        pytest.param(["--output-prefix", "p_"], "--output-prefix '' then, 'p_' now", 40, id="another-prefix"),
        pytest.param(["--input-format", "lines"], "--input-format 'csv' then, 'lines' now", 41, id="another-reading"),
    ],
)
def test_a_resume_is_refused_when_another_run_made_the_output(
    tmp_path, tiny_config, bpe_dir, capsys, change, named, rows
):
    """The same --out with another input (the issue's 22,296 rows resumed with 81), checkpoint or option that
    changes records: refused before anything is written, naming what differs and how to start over."""
    checkpoint = calibrated_checkpoint(tmp_path / "ckpt", tiny_config, bpe_dir)
    data = write_input(tmp_path / "in.csv", [f"message number {i}" for i in range(40)])
    out = _results_made_by(tmp_path, checkpoint, data)
    files = [out, Path(f"{out}.bad-rows.jsonl"), Path(f"{out}.summary.json")]
    before = {path: path.read_bytes() for path in files}
    argv = ["--checkpoint", checkpoint, "--data", data, "--out", out]
    if change == "input":
        data.unlink()
        write_input(data, [f"another text {i}" for i in range(5)])  # the same path, other content
    elif change == "checkpoint":
        edit_tensors(lambda state: state["score.bias"].add_(1.0))(checkpoint)
    else:
        argv += change
    assert predict(*argv) == 1
    err = capsys.readouterr().err
    assert named in err and "another --out" in err and "--no-resume" in err
    assert {path: path.read_bytes() for path in files} == before
    assert predict(*argv, "--no-resume") == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["complete"] and summary["rows_kept_from_earlier_run"] == 0
    assert summary["rows_written"] == len(read_output(out)) == rows  # the header is a line when read as lines


def test_the_record_of_the_run_is_written_before_the_first_row(tmp_path, tiny_checkpoint, monkeypatch):
    """A run killed before its summary is written leaves the record of what made it: the rerun resumes it and
    gives what one uninterrupted run gives."""
    data = write_input(tmp_path / "in.csv", [f"message number {i}" for i in range(20)])
    full = tmp_path / "full.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", full) == 0
    chunks, score = [], Classifier.classify

    def killed_in_the_second_chunk(self, texts):
        chunks.append(len(texts))
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return score(self, texts)

    monkeypatch.setattr(Classifier, "classify", killed_in_the_second_chunk)
    out = tmp_path / "out.csv"
    with pytest.raises(KeyboardInterrupt):
        predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out, "--chunk-rows", "8")
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert not summary["complete"] and "rows_written" not in summary
    assert summary["run"]["input"] == {
        "bytes": data.stat().st_size,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
    }
    assert (
        summary["run"]["checkpoint"]["model.safetensors"]
        == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    )
    assert len(read_output(out)) == 8
    monkeypatch.setattr(Classifier, "classify", score)
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["complete"] and (summary["rows_kept_from_earlier_run"], summary["rows_scored"]) == (8, 12)
    assert_results_equal(read_output(out), [_as_result(row) for row in read_output(full)])


def test_results_whose_record_is_gone_are_not_resumed(tmp_path, tiny_checkpoint, capsys):
    data = write_input(tmp_path / "in.csv", TEXTS)
    out = _results_made_by(tmp_path, tiny_checkpoint, data)
    Path(f"{out}.summary.json").unlink()
    content = out.read_bytes()
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 1
    assert "does not record the run that made it" in capsys.readouterr().err
    assert out.read_bytes() == content


@pytest.mark.parametrize(
    ("data", "out"),
    [
        pytest.param("in.txt", "sub/../in.txt", id="another-path"),
        pytest.param("in.txt", "link.txt", id="symlink"),
        pytest.param("in.txt", "hardlink.txt", id="hard-link"),
        pytest.param("in.txt", "mirror/in.txt", id="linked-directory"),
        pytest.param("r.csv.summary.json", "r.csv", id="summary-is-input"),
        pytest.param("r.csv.bad-rows.jsonl", "r.csv", id="bad-rows-is-input"),
    ],
)
@pytest.mark.parametrize("resume", ["--resume", "--no-resume"])
def test_the_input_is_never_written_over(tmp_path, tiny_checkpoint, capsys, data, out, resume):
    """Whatever the flags: an --out (or a file beside it) that is the input by any name is refused up front."""
    data = tmp_path / data
    data.write_text("".join(text + "\n" for text in TEXTS if "\n" not in text))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to(data)
    (tmp_path / "hardlink.txt").hardlink_to(data)
    (tmp_path / "mirror").symlink_to(tmp_path, target_is_directory=True)
    content = data.read_bytes()
    argv = ["--data", data, "--out", tmp_path / out, "--input-format", "lines", "--output-format", "csv", resume]
    with pytest.raises(SystemExit) as exit_info:
        predict("--checkpoint", tiny_checkpoint, *argv)
    assert exit_info.value.code == 2
    assert "which is the input file" in capsys.readouterr().err
    assert data.read_bytes() == content


def test_an_sms_spam_collection_file_is_read_as_finetune_reads_it(tmp_path, tiny_checkpoint):
    """label<TAB>text lines (quotes are text, not CSV quoting): the text is scored, the label kept as true_label;
    a line without a tab is a bad row, where finetune refuses the file naming it."""
    lines = ["ham\tGo until jurong point, crazy..", 'spam\tFree "entry" in 2 a wkly comp', "ham\tOk lar..."]
    good = tmp_path / "good" / "SMSSpamCollection"
    good.parent.mkdir()
    good.write_text("".join(line + "\n" for line in lines))
    data = tmp_path / "SMSSpamCollection"
    data.write_text("".join(line + "\n" for line in [*lines[:2], "no tab on this line", lines[2]]))
    out = tmp_path / "out.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    rows = read_output(out)
    assert list(rows[0])[:4] == ["true_label", "text", "line", "label"]
    dataset = load_sms_spam(good)
    assert [row["text"] for row in rows] == list(dataset.texts)
    assert [row["true_label"] for row in rows] == list(dataset.labels)
    assert [row["line"] for row in rows] == ["1", "2", "4"]
    assert [json.loads(b)["line"] for b in Path(f"{out}.bad-rows.jsonl").read_text().splitlines()] == [3]
    assert_results_equal(rows, classify(tiny_checkpoint, list(dataset.texts)))


BIG = "spam " * (MAX_ROW_CHARS // 5 + 1)  # one character over the limit once a line or record holds it


@pytest.mark.parametrize(
    ("name", "content", "lines"),
    [
        # a quoted field over the limit spanning lines: its remainder ("forged,row") is never read as a row
        pytest.param("in.csv", f'id,text\n1,hello\n2,"{BIG}\nforged,row"\n3,after\n', [2, 5], id="csv"),
        pytest.param("in.tsv", f'id\ttext\n1\thello\n2\t"{BIG}\nforged\trow"\n3\tafter\n', [2, 5], id="tsv"),
        pytest.param(
            "in.jsonl", '{"text": "hello"}\n' + json.dumps({"text": BIG}) + '\n{"text": "after"}\n', [1, 3], id="jsonl"
        ),
        pytest.param("in.txt", f"hello\n{BIG}\nafter\n", [1, 3], id="lines"),
        pytest.param("SMSSpamCollection", f"ham\thello\nspam\t{BIG}\nham\tafter\n", [1, 3], id="sms"),
    ],
)
def test_a_row_over_the_size_limit_is_one_bad_row_in_every_format(tmp_path, tiny_checkpoint, name, content, lines):
    """finetune's `field larger than field limit` CSV: here a bad row named by the line it starts on, and the run
    goes on; the same limit holds in every format, and csv's own limit is left as it was."""
    limit = csv.field_size_limit()
    data, out = tmp_path / name, tmp_path / "out.jsonl"
    data.write_text(content)
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    rows = read_output(out)
    assert [row["text"] for row in rows] == ["hello", "after"]
    assert [row["line"] for row in rows] == lines
    bad = [json.loads(b) for b in Path(f"{out}.bad-rows.jsonl").read_text().splitlines()]
    assert bad == [{"line": lines[0] + 1, "error": f"longer than {MAX_ROW_CHARS} characters"}]
    assert csv.field_size_limit() == limit


def test_a_row_just_under_the_size_limit_is_scored_and_reads_back(tmp_path, tiny_checkpoint):
    text = "spam " * (MAX_ROW_CHARS // 5 - 2)
    data, out = write_input(tmp_path / "in.csv", ["hello", text]), tmp_path / "out.csv"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0
    assert [row["text"] for row in read_output(out)] == ["hello", text]  # csv's default limit reads it back
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", out) == 0  # and a resume does


def test_a_rows_result_moves_only_by_rounding_with_the_shapes_it_is_computed_in(tmp_path, tiny_checkpoint):
    """The batch-independence bound docs/scoring.md states: each row alone (one a chunk, one a batch) against chunks
    and batches cut elsewhere, probabilities within 1e-6 and the same labels; nothing (resume included) needs them
    bitwise."""
    texts = [f"message {i}: " + "win a prize " * (i % 7) for i in range(30)]
    data = write_input(tmp_path / "in.csv", texts)
    alone, batched = tmp_path / "alone.jsonl", tmp_path / "batched.jsonl"
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", alone, "--chunk-rows", "1") == 0
    argv = ["--chunk-rows", "11", "--batch-size", "4"]
    assert predict("--checkpoint", tiny_checkpoint, "--data", data, "--out", batched, *argv) == 0
    for a, b in zip(read_output(alone), read_output(batched), strict=True):
        assert a["label"] == b["label"] and a["tokens"] == b["tokens"]
        assert abs(a["probability_spam"] - b["probability_spam"]) <= 1e-6
