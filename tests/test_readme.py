"""The README's configuration tables cannot drift from the code: every setting is documented, and every SPAMGPT_
variable the README names is read somewhere."""

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
