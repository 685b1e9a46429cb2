"""spamgpt against SpamAssassin's own Bayes filter on real mail: the SpamAssassin public corpus, one fixed split.

    python -m benchmarks.mail_bayes                   # tiny and the 124M architecture, Bayes, the SMS crossings
    python -m benchmarks.mail_bayes --presets tiny    # minutes

Results go to benchmarks/results/mail_bayes_<presets>.json (the split's file names included) and a table on stdout.

The corpus (../shared/data/spamassassin-public-corpus: ham/ 2,500 easy and 250 hard ham, spam/ 500) is read by the
product (training.runtime.mail_sources, read_message with the default extraction), duplicates of the extracted text
removed as `finetune` removes them (exact and near), then split once, seeded, 70 / 15 / 15 within each of spam, easy
ham and hard ham, so hard ham sits in train, validation and test alike.

Contenders, each learning from the same train messages and judged on the same test messages:

- SpamAssassin's Bayes (Debian's spamassassin package): `sa-learn --spam` / `--ham` on the train files into a
  private database, then every test file scored by Mail::SpamAssassin with a configuration that holds the Bayes
  rules alone (23_bayes.cf, plus the TLD lists its URI tokens use), network tests off, no auto-learning. Its verdict
  is the Bayes probability above 0.5 (BAYES_50 is the neutral band; a score threshold means nothing with one rule).
- spamgpt from random weights (no pretrained weights are reachable here), trained by the product's loop
  (training.finetune.loop.train) with a recipe per size (RECIPES), picking its best epoch on the validation split;
  its verdict is argmax, as the model is trained on the split's own label rates. Scoring time includes reading each
  test message (read_message), tokenizing and the forward passes.

Both are also given the same architecture trained on SMS (the SMS Spam Collection, deduplicated, training.finetune
.data.partition with no balancing): that model judged on the mail test messages, and the mail model judged on the SMS
evaluation rows, to show how far a model travels. Rates carry 95% Wilson intervals (training.finetune.evaluate.Rate).
Times: wall and CPU seconds; the test set is scored in ROUNDS, contenders interleaved, so load on the machine falls on
all alike (ratios within one run are what to compare).
"""

import argparse
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import BPE_DIR, SHARED_DATA, SMS_FILE, print_table, write_result
from training.config import TrainConfig
from training.finetune.data import Dataset, deduplicate, load_sms_spam, partition, stratified_split
from training.finetune.evaluate import Rate, roc_auc
from training.finetune.loop import train
from training.finetune.pipeline import encode
from training.runtime.inference import predict_logits, probabilities
from training.runtime.mail import DEFAULT_EXTRACTION, read_message
from training.runtime.mail_sources import Mail, read_mail
from training.runtime.model import GPTClassifier, GPTConfig
from training.runtime.tokenizer import encode_batch, load_gpt2_bpe

CORPUS = SHARED_DATA / "spamassassin-public-corpus"
SEED = 123
FRACTIONS = (0.7, 0.15, 0.15)  # train, validation, test within each group
GROUPS = ("spam", "easy_ham", "hard_ham")
LABELS = ["ham", "spam"]
ROUNDS = 3
# What each size trains, from random weights. tiny (2 blocks of width 32, 64 positions): every parameter, a high
# rate, more epochs: it learns from nothing. gpt2 (124M): the last block, final norm and head on the cached output
# of the 11 frozen random blocks, 64 tokens (subject and the start of the body) and 3 epochs, so the prefix runs once
# over the data and the run fits in an hour on 2 shared cores; a rate above the fine-tuning default, since the
# trainable block starts from random weights too.
RECIPES = {
    "tiny": {"train": dict(trainable="all", epochs=4, batch_size=32, lr=2e-3), "max_tokens": 64},
    "gpt2": {"train": dict(trainable="last-blocks", epochs=3, batch_size=16, lr=3e-4), "max_tokens": 64},
}
BAYES_RULE_FILES = ("23_bayes.cf", "20_aux_tlds.cf")  # the Bayes rules, and the TLD lists URI tokens are cut by
SA_RULES = Path("/usr/share/spamassassin")
SA_MIN_LEARNED = 200  # SpamAssassin's bayes_min_spam_num / bayes_min_ham_num defaults
# One Perl process scores a list of files, as spamd would: the configuration is compiled once. Prints
# `path<TAB>bayes probability<TAB>rules hit` per file.
SCORE_PL = r"""
use strict; use warnings;
use Mail::SpamAssassin;
my ($rules, $state) = @ARGV;
my $sa = Mail::SpamAssassin->new({rules_filename => $rules, site_rules_filename => "$state/site",
  userprefs_filename => "$state/user_prefs", userstate_dir => $state, local_tests_only => 1, dont_copy_prefs => 1});
$sa->compile_now(0);
$| = 1;
while (my $path = <STDIN>) {
  chomp $path;
  open(my $fh, '<:raw', $path) or die "$path: $!";
  my @lines = <$fh>; close $fh;
  my $mail = $sa->parse(\@lines);
  my $status = $sa->check($mail);
  print join("\t", $path, $status->get_tag('BAYES'), join(',', $status->get_names_of_tests_hit())), "\n";
  $status->finish; $mail->finish;
}
"""


@dataclass(frozen=True)
class Message:
    path: Path
    group: str  # one of GROUPS
    text: str  # read_message's text

    @property
    def label(self) -> str:
        return "spam" if self.group == "spam" else "ham"


# --- Data --------------------------------------------------------------------------------------------------------


def group_of(path: Path) -> str:
    """spam, easy_ham or hard_ham, by the corpus's folder and file names (hard-ham-1-*, easy-ham-1-*)."""
    if path.parent.name == "spam":
        return "spam"
    return "hard_ham" if path.name.startswith("hard-ham") else "easy_ham"


def load_corpus(corpus: Path) -> tuple[list[Message], list[str]]:
    """Every readable message of the corpus, as the product reads it; and the unreadable ones, named."""
    messages, unreadable = [], []
    for item in read_mail(corpus, DEFAULT_EXTRACTION):
        if isinstance(item, Mail):
            path = corpus / item.origin.path
            messages.append(Message(path, group_of(path), item.mail.text))
        else:
            unreadable.append(f"{item.origin}: {item.error}")
    return messages, unreadable


def fixed_split(messages: list[Message], seed: int = SEED) -> tuple[dict[str, list[Message]], dict]:
    """{train, validation, test: messages}: duplicates of the text removed (training.finetune.data.deduplicate,
    the first kept), then each group split by FRACTIONS (stratified_split with the groups as its labels); and how
    many duplicates were dropped."""
    by_text = {}
    for m in messages:
        by_text.setdefault(m.text, m)
    unique = deduplicate(Dataset([m.text for m in messages], [m.group for m in messages]))
    split = stratified_split(unique, seed, FRACTIONS)
    parts = {name: [by_text[t] for t in getattr(split, name).texts] for name in ("train", "validation", "test")}
    return parts, {"read": len(messages), "after_deduplication": len(unique.texts)}


def rates(spam_probability: list[float], messages: list[Message], auc: bool = True) -> dict:
    """Accuracy, spam recall, false-positive rate on all ham and on hard ham (each a Rate: value, count, of, 95%
    Wilson interval) of verdicts `spam_probability > 0.5`; with ROC-AUC of the probabilities (spam positive)."""
    flagged = [p > 0.5 for p in spam_probability]
    spam = [f for f, m in zip(flagged, messages, strict=True) if m.label == "spam"]
    ham = [f for f, m in zip(flagged, messages, strict=True) if m.label == "ham"]
    hard = [f for f, m in zip(flagged, messages, strict=True) if m.group == "hard_ham"]
    right = sum(f == (m.label == "spam") for f, m in zip(flagged, messages, strict=True))
    out = {
        "accuracy": Rate.of_counts(right, len(messages)),
        "spam_recall": Rate.of_counts(sum(spam), len(spam)),
        "fpr_ham": Rate.of_counts(sum(ham), len(ham)),
        "fpr_hard_ham": Rate.of_counts(sum(hard), len(hard)),
    }
    out = {name: vars(rate) for name, rate in out.items()}
    if auc:
        positives = torch.tensor([m.label == "spam" for m in messages])
        out["roc_auc"] = roc_auc(torch.tensor(spam_probability), positives)
    return out


# --- SpamAssassin's Bayes ----------------------------------------------------------------------------------------


def bayes_config(directory: Path, min_learned: int = SA_MIN_LEARNED) -> Path:
    """A SpamAssassin rules directory in `directory` holding the Bayes rules alone, with its database in
    `directory`/state; returns the rules directory. The site directory (state/site) is empty, so none of
    /etc/spamassassin's plugins or rules load."""
    rules, state = directory / "rules", directory / "state"
    (state / "site").mkdir(parents=True)
    rules.mkdir()
    for name in BAYES_RULE_FILES:
        lines = (SA_RULES / name).read_text().splitlines()
        (rules / name).write_text("\n".join(line for line in lines if not line.startswith("require_version")) + "\n")
    (rules / "bayes_only.pre").write_text(
        "loadplugin Mail::SpamAssassin::Plugin::Check\nloadplugin Mail::SpamAssassin::Plugin::Bayes\n"
    )
    (rules / "local.cf").write_text(
        f"use_bayes 1\nbayes_auto_learn 0\nuse_network_tests 0\nbayes_path {state}/bayes\n"
        f"bayes_min_spam_num {min_learned}\nbayes_min_ham_num {min_learned}\n"
    )
    return rules


def sa_learn(rules: Path, messages: list[Message]) -> dict:
    """`sa-learn --spam` then `--ham` on the messages' files; what each said it learned."""
    state = rules.parent / "state"
    said = {}
    for label in ("spam", "ham"):
        listing = state / f"{label}.list"
        listing.write_text("".join(f"{m.path}\n" for m in messages if m.label == label))
        command = ["sa-learn", "-L", "-C", str(rules), "--siteconfigpath", str(state / "site")]
        command += ["-p", str(state / "user_prefs"), f"--{label}", "-f", str(listing)]
        said[label] = _run(command, env_home=state).strip().splitlines()[-1]
    return said


def sa_score(rules: Path, messages: list[Message]) -> list[tuple[float, str]]:
    """(Bayes spam probability, the rules hit) of each message's file, in order."""
    state = rules.parent / "state"
    script = state / "score.pl"
    script.write_text(SCORE_PL)
    listing = "".join(f"{m.path}\n" for m in messages)
    out = _run(["perl", str(script), str(rules), str(state)], env_home=state, stdin=listing)
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == [str(m.path) for m in messages], "perl answered other files"
    return [(float(r[1]), r[2] if len(r) > 2 else "") for r in rows]


def _run(command: list[str], env_home: Path, stdin: str | None = None) -> str:
    """stdout of `command` with HOME in the private state (SpamAssassin writes ~/.spamassassin otherwise)."""
    done = subprocess.run(
        command, input=stdin, capture_output=True, text=True, check=False, env={"HOME": str(env_home), "PATH": _path()}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _path() -> str:
    return "/usr/local/bin:/usr/bin:/bin"


# --- spamgpt -----------------------------------------------------------------------------------------------------


def train_spamgpt(preset: str, train_ds: Dataset, validation: Dataset, enc, seed: int = SEED):
    """A `preset` classifier from seeded random weights trained on train_ds by RECIPES[preset]; (model, history)."""
    recipe = RECIPES[preset]
    torch.manual_seed(seed)
    model = GPTClassifier(GPTConfig.from_preset(preset, vocab_size=enc.n_vocab, n_labels=len(LABELS)))
    config = TrainConfig(**recipe["train"], seed=seed, device="cpu", precision="float32")
    train_rows, val_rows = (encode(enc, ds, LABELS, recipe["max_tokens"]) for ds in (train_ds, validation))
    history = train(model, train_rows, val_rows, config)
    return model, history


def spam_probabilities(model: GPTClassifier, enc, texts: list[str], max_tokens: int) -> list[float]:
    rows, _ = encode_batch(enc, texts, max_tokens)
    return probabilities(predict_logits(model, rows, 32))[:, LABELS.index("spam")].tolist()


def score_files(model: GPTClassifier, enc, messages: list[Message], max_tokens: int) -> list[float]:
    """Spam probabilities of the messages' files as scoring meets them: read, read_message, tokenized, forward."""
    texts = [read_message(m.path.read_bytes(), DEFAULT_EXTRACTION).text for m in messages]
    return spam_probabilities(model, enc, texts, max_tokens)


# --- The run -----------------------------------------------------------------------------------------------------


class Clock:
    """Wall and CPU seconds (this process and its children) of a block, added up under a name."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class _Timed:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), _cpu()

            def __exit__(self, *exc):
                entry = clock.seconds.setdefault(name, {"wall": 0.0, "cpu": 0.0})
                entry["wall"] += time.perf_counter() - self.wall
                entry["cpu"] += _cpu() - self.cpu

        return _Timed()


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def as_dataset(messages: list[Message]) -> Dataset:
    return Dataset([m.text for m in messages], [m.label for m in messages])


def run(
    presets: list[str],
    save: Callable[[dict], None],
    corpus: Path = CORPUS,
    sms_file: Path = SMS_FILE,
    bpe_dir: Path = BPE_DIR,
) -> dict:
    """The whole benchmark (the module's docstring); the JSON's content, also given to `save` once the contenders are
    judged (with "complete": false) and again at the end."""
    clock = Clock()
    messages, unreadable = load_corpus(corpus)
    parts, dedup = fixed_split(messages)
    test = parts["test"]
    _, enc = load_gpt2_bpe(bpe_dir)
    result = {
        "complete": False,
        "corpus": str(corpus),
        "extraction": DEFAULT_EXTRACTION.to_json(),
        "weights": "random initialisation, seed 123 (no pretrained weights reachable here)",
        "unreadable": unreadable,
        "deduplication": dedup,
        "split": {
            "seed": SEED,
            "fractions": dict(zip(("train", "validation", "test"), FRACTIONS, strict=True)),
            "sizes": {name: _counts([m.group for m in ms]) for name, ms in parts.items()},
            "files": {name: [str(m.path.relative_to(corpus)) for m in ms] for name, ms in parts.items()},
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="mail_bayes-"))
    try:
        rules = bayes_config(workdir)
        with clock("bayes train"):
            learned = sa_learn(rules, parts["train"])
        models, histories = {}, {}
        for preset in presets:
            with clock(f"{preset} train"):
                models[preset], histories[preset] = train_spamgpt(
                    preset, as_dataset(parts["train"]), as_dataset(parts["validation"]), enc
                )
        # the test set, scored in rounds with the contenders interleaved
        scores = {name: [] for name in ["bayes", *presets]}
        bayes_rules_hit = []
        for r in range(ROUNDS):
            share = test[r * len(test) // ROUNDS : (r + 1) * len(test) // ROUNDS]
            with clock("bayes score"):
                answered = sa_score(rules, share)
            scores["bayes"] += [p for p, _ in answered]
            bayes_rules_hit += [hit for _, hit in answered]
            for preset in presets:
                with clock(f"{preset} score"):
                    scores[preset] += score_files(models[preset], enc, share, RECIPES[preset]["max_tokens"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    contenders = {
        "bayes": {
            "what": "SpamAssassin Bayes alone (sa-learn, Mail::SpamAssassin check), verdict: Bayes probability > 0.5",
            "learned": learned,
            "rules_hit_on_test": _counts(bayes_rules_hit),
        }
    }
    for preset in presets:
        contenders[f"spamgpt {preset}"] = {
            "what": f"spamgpt {preset} from random weights, verdict: argmax",
            "recipe": RECIPES[preset],
            "parameters": sum(p.numel() for p in models[preset].parameters()),
            "best_epoch": histories[preset].best_epoch,
            "history": histories[preset].to_json()["epochs"],
        }
    for name, entry in contenders.items():
        key = "bayes" if name == "bayes" else name.removeprefix("spamgpt ")
        entry["test"] = rates(scores[key], test)
        entry["spam_probability_on_test"] = [round(p, 4) for p in scores[key]]  # in the order of split.files.test
        entry["train_seconds"] = clock.seconds[f"{key} train"]
        entry["score_seconds"] = clock.seconds[f"{key} score"]
        entry["score_ms_per_message"] = round(1000 * clock.seconds[f"{key} score"]["wall"] / len(test), 2)
    result |= {"contenders": contenders, "crossings": {}}
    save(result)

    sms = deduplicate(load_sms_spam(sms_file))
    sms_parts = partition(sms, SEED, "none")
    sms_eval = [
        Message(Path(f"sms-{i}"), "spam" if label == "spam" else "easy_ham", text)
        for i, (text, label) in enumerate(zip(sms_parts.evaluation.texts, sms_parts.evaluation.labels, strict=True))
    ]
    result["sms"] = {"file": str(sms_file), "train": len(sms_parts.train.texts), "evaluation": len(sms_eval)}
    for preset in presets:
        max_tokens = RECIPES[preset]["max_tokens"]
        with clock(f"{preset} SMS train"):
            sms_model, _ = train_spamgpt(preset, sms_parts.train, sms_parts.validation, enc)
        judged = {
            "SMS-trained on mail test": (sms_model, test),
            "SMS-trained on SMS evaluation": (sms_model, sms_eval),
            "mail-trained on SMS evaluation": (models[preset], sms_eval),
        }
        for name, (model, rows) in judged.items():
            probs = spam_probabilities(model, enc, [m.text for m in rows], max_tokens)
            result["crossings"][f"{preset}: {name}"] = rates(probs, rows)
        result["crossings"][f"{preset}: SMS-trained on mail test"]["train_seconds"] = clock.seconds[
            f"{preset} SMS train"
        ]
    result["complete"] = True
    save(result)
    return result


def _counts(values: list[str]) -> dict[str, int]:
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def table(result: dict) -> list[dict]:
    """One row per contender and crossing: the rates as "value [low, high]" in percent, and the times."""

    def cell(rate: dict) -> str:
        if rate["value"] is None:
            return "n/a"
        low, high = rate["ci95"]
        return f"{100 * rate['value']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for name, entry in [*result["contenders"].items(), *result["crossings"].items()]:
        test = entry.get("test", entry)
        rows.append(
            {
                "model": name,
                "accuracy %": cell(test["accuracy"]),
                "spam recall %": cell(test["spam_recall"]),
                "FPR ham %": cell(test["fpr_ham"]),
                "FPR hard ham %": cell(test["fpr_hard_ham"]),
                "ROC-AUC": test.get("roc_auc"),
                "train s (cpu)": _seconds(entry.get("train_seconds")),
                "score ms/msg": entry.get("score_ms_per_message"),
            }
        )
    return rows


def _seconds(entry: dict | None) -> str | None:
    return None if entry is None else f"{entry['wall']:.0f} ({entry['cpu']:.0f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mail_bayes", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    if not (CORPUS / "spam").is_dir() or not SMS_FILE.is_file() or not (BPE_DIR / "vocab.bpe").is_file():
        parser.exit(1, f"needs the SpamAssassin corpus, the SMS data and GPT-2's BPE files under {SHARED_DATA}\n")
    if shutil.which("sa-learn") is None:
        parser.exit(1, "needs SpamAssassin (Debian: apt-get install spamassassin)\n")
    torch.manual_seed(SEED)
    name = "_".join(["mail_bayes", *args.presets])
    result = run(args.presets, save=lambda partial: write_result(name, partial))
    print_table(table(result))
    print(f"written to benchmarks/results/{name}.json")


if __name__ == "__main__":
    main()
