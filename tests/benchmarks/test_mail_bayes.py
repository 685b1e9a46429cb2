"""The mail benchmark's logic: the fixed split, the rates and their intervals, and SpamAssassin's Bayes trained and
run offline with its rules alone (skipped where Debian's spamassassin is not installed)."""

import shutil
from pathlib import Path

import pytest

import benchmarks.mail_bayes
from benchmarks.mail_bayes import Message, bayes_config, fixed_split, group_of, main, rates, sa_learn, sa_score
from training.finetune.evaluate import wilson_interval


def corpus(n_spam: int = 40, n_easy: int = 80, n_hard: int = 20) -> list[Message]:
    groups = [("spam", n_spam), ("easy_ham", n_easy), ("hard_ham", n_hard)]
    return [Message(Path(f"/corpus/{g}-{i}"), g, f"message {g} {i}") for g, n in groups for i in range(n)]


def test_the_split_is_seeded_stratified_by_group_and_keeps_each_text_in_one_split():
    messages = corpus()
    messages.append(Message(Path("/corpus/copy"), "spam", "MESSAGE  spam 3"))  # a near duplicate: dropped
    parts, dedup = fixed_split(messages)
    assert dedup == {"read": 141, "after_deduplication": 140}
    sizes = {
        name: [sum(m.group == g for m in ms) for g in ("spam", "easy_ham", "hard_ham")] for name, ms in parts.items()
    }
    assert sizes == {"train": [28, 56, 14], "validation": [6, 12, 3], "test": [6, 12, 3]}  # hard ham in each
    texts = [m.text for ms in parts.values() for m in ms]
    assert len(texts) == len(set(texts)) == 140
    assert fixed_split(messages)[0] == parts  # the same split every run
    assert fixed_split(messages, seed=1)[0]["test"] != parts["test"]


def test_the_corpus_groups_come_from_its_folder_and_file_names():
    assert group_of(Path("c/spam/spam-1-00001.eml")) == "spam"
    assert group_of(Path("c/ham/hard-ham-1-00001.eml")) == "hard_ham"
    assert group_of(Path("c/ham/easy-ham-1-00001.eml")) == "easy_ham"


def test_rates_count_verdicts_above_one_half_with_wilson_intervals():
    messages = corpus(n_spam=4, n_easy=4, n_hard=2)
    # spam: 3 of 4 caught; easy ham: 1 of 4 flagged; hard ham: 1 of 2 flagged; 0.5 itself is no verdict of spam
    spam_probability = [0.9, 0.8, 0.7, 0.5, 0.6, 0.1, 0.2, 0.5, 0.99, 0.0]
    result = rates(spam_probability, messages)
    assert result["spam_recall"] == {"value": 0.75, "count": 3, "of": 4, "ci95": wilson_interval(3, 4)}
    assert result["fpr_ham"] == {"value": 2 / 6, "count": 2, "of": 6, "ci95": wilson_interval(2, 6)}
    assert result["fpr_hard_ham"] == {"value": 0.5, "count": 1, "of": 2, "ci95": wilson_interval(1, 2)}
    assert result["accuracy"]["count"] == 3 + 4 == 7 and result["accuracy"]["of"] == 10
    assert 0 < result["roc_auc"] < 1


def test_the_benchmark_exits_with_a_message_without_the_shared_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmarks.mail_bayes, "CORPUS", tmp_path / "absent")
    with pytest.raises(SystemExit) as exit_info:
        main(["--presets", "tiny"])
    assert exit_info.value.code == 1 and "needs the SpamAssassin corpus" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("sa-learn") is None, reason="Debian's spamassassin is not installed")
def test_bayes_alone_learns_and_scores_offline_in_a_private_database(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing may be written to the user's ~/.spamassassin
    words = {"spam": "viagra casino lottery winner", "ham": "meeting agenda minutes project"}
    messages = []
    for i in range(24):
        label = "spam" if i % 2 else "ham"
        path = tmp_path / "corpus" / f"{label}-{i}.eml"
        path.parent.mkdir(exist_ok=True)
        body = f"{words[label]} {i}\n" * 5
        path.write_text(f"From: a{i}@example.com\nSubject: {words[label]}\nMessage-ID: <{i}@example.com>\n\n{body}")
        messages.append(Message(path, "spam" if label == "spam" else "easy_ham", ""))
    rules = bayes_config(tmp_path / "sa", min_learned=5)
    learned = sa_learn(rules, messages[:20])
    assert learned == {
        "spam": "Learned tokens from 10 message(s) (10 message(s) examined)",
        "ham": "Learned tokens from 10 message(s) (10 message(s) examined)",
    }
    answered = sa_score(rules, messages[20:])
    hits = [hit.split(",") for _, hit in answered]
    assert all(rule.startswith("BAYES_") for rules_hit in hits for rule in rules_hit)  # the Bayes rules alone ran
    assert [rules_hit[0] for rules_hit in hits] == ["BAYES_00", "BAYES_99"] * 2
    assert [p > 0.5 for p, _ in answered] == [False, True] * 2
    assert not (tmp_path / "home").exists()
