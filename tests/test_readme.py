"""The README and the reference pages under docs/ cannot drift from the code: every setting is documented, and every
SPAMGPT_ variable they name is read somewhere; their examples work when copied in order; every link between them
(and to files in the repository) lands on a file and a heading that exist."""

import re
from pathlib import Path

from app.settings import Settings
from tests.helpers import documentation_pages, sibling
from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"SPAMGPT_[A-Z0-9_]*[A-Z0-9]")


def readme_variables() -> set[str]:
    return {name for page in documentation_pages() for name in VARIABLE.findall(page.read_text(encoding="utf-8"))}


def test_every_setting_is_in_the_readme():
    settings = {f"SPAMGPT_{name.upper()}" for name in Settings.model_fields}
    assert settings - readme_variables() == set()


def test_every_variable_in_the_readme_is_read_somewhere():
    sources = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", ROOT / "run.sh", ROOT / "Dockerfile"]
    sources += [*(ROOT / "training").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    read = {f"SPAMGPT_{name.upper()}" for name in Settings.model_fields}
    for path in sources:
        read |= set(VARIABLE.findall(path.read_text(encoding="utf-8")))
    assert readme_variables() - read == set()


def readme_command(start: str, page: str = "docs/training.md") -> list[str]:
    """The page's first shell command beginning with `start`, its continuation lines joined, split into words."""
    text = (ROOT / page).read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(start))
    return line.split()


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_the_evaluate_example_reads_the_columns_the_finetune_example_trained_on():
    # copied after the finetune example, the evaluate example must read my.csv the same way, else it fails with
    # "no column 'text'"
    finetune = readme_command("python -m training finetune --data my.csv")
    evaluate = readme_command("python -m training evaluate --checkpoint checkpoints/mine --data my.csv")
    for name in ("--text-column", "--label-column"):
        assert option(finetune, name) is not None and option(evaluate, name) == option(finetune, name), name


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_link_in_the_readme_and_docs_lands():
    broken = []
    for page in [*documentation_pages(), ROOT / "benchmarks" / "README.md"]:
        text = page.read_text(encoding="utf-8")
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no file)")
            elif anchor and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading)")
    assert broken == []


def test_the_readme_links_every_page_under_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [page.name for page in documentation_pages()[1:] if f"](docs/{page.name})" not in readme] == []


def python_block(page: str, after: str) -> str:
    """The first ```python block of `page` after the text `after`."""
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_the_shared_prefix_example_runs_as_written(tmp_path, tiny_config, bpe_dir, monkeypatch, capsys):
    checkpoints = tmp_path / "checkpoints"
    sibling(checkpoints / "spam", tiny_config, bpe_dir, base_seed=0, tail_seed=1)
    sibling(checkpoints / "questions", tiny_config, bpe_dir, base_seed=0, tail_seed=2, labels=("question", "other"))
    texts = ["WINNER!! Claim your free prize now", "See you at 5?"]
    alone = {
        name: [p.label for p in Classifier.load(checkpoints / name, ClassifierOptions(device="cpu")).classify(texts)]
        for name in ("spam", "questions")
    }
    monkeypatch.chdir(tmp_path)
    exec(python_block("docs/serving.md", "Served together from Python"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["['spam', 'questions']", f"spam {alone['spam']}", f"questions {alone['questions']}"]
