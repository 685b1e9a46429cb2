"""The README's configuration tables cannot drift from the code: every setting is documented, and every SPAMGPT_
variable the README names is read somewhere; its examples work when copied in order."""

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"SPAMGPT_[A-Z0-9_]*[A-Z0-9]")


def readme_variables() -> set[str]:
    return set(VARIABLE.findall((ROOT / "README.md").read_text(encoding="utf-8")))


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


def readme_command(start: str) -> list[str]:
    """The README's first shell command beginning with `start`, its continuation lines joined, split into words."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
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
