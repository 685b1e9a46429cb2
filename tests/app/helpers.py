"""Settings for an app on the tiny checkpoint, passed straight to the factory.

Plain functions, not a tests/app/conftest.py: a second module named conftest would shadow tests/conftest.py
for the `from conftest import ...` of other test packages.
"""

from pathlib import Path

from app.settings import Settings


def tiny_settings(checkpoint_dir: Path, **overrides) -> Settings:
    return Settings(**{"checkpoint_dir": checkpoint_dir, "device": "cpu", **overrides})
