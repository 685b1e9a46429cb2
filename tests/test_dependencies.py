"""The installed dependencies meet pyproject.toml's floors (several chosen to skip releases with published
advisories), and no multipart parser is installed: the API takes JSON only, so a form parser is attack surface
that nothing uses."""

import importlib.util
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(line) for line in PROJECT["dependencies"]]
DECLARED = RUNTIME + [Requirement(line) for extra in PROJECT["optional-dependencies"].values() for line in extra]


@pytest.mark.parametrize("requirement", [pytest.param(r, id=r.name) for r in RUNTIME])
def test_the_installed_version_meets_the_floor(requirement):
    installed = version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), f"{installed} does not meet {requirement}"


@pytest.mark.parametrize("name", ["starlette", "torch", "uvicorn", "fastapi"])
def test_the_serving_stack_has_a_floor(name):
    (requirement,) = [r for r in RUNTIME if canonicalize_name(r.name) == name]
    assert any(spec.operator == ">=" for spec in requirement.specifier), requirement


def brings(requirement: Requirement) -> set[str]:
    """What installing `requirement` (with its extras) pulls in directly, from the installed metadata; nothing for
    an extra's package that is not installed here (the `ray` extra, outside CI's Ray step, which runs this again)."""
    extras = requirement.extras or {""}
    try:
        pulled = (Requirement(line) for line in distribution(requirement.name).requires or [])
    except PackageNotFoundError:
        return set()
    return {
        canonicalize_name(r.name)
        for r in pulled
        if r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in extras)
    }


def test_no_multipart_parser_is_installed_or_required():
    with pytest.raises(PackageNotFoundError):
        version("python-multipart")
    assert importlib.util.find_spec("multipart") is None
    assert importlib.util.find_spec("python_multipart") is None
    others = [r for r in DECLARED if canonicalize_name(r.name) != canonicalize_name(PROJECT["name"])]
    assert "python-multipart" not in {canonicalize_name(r.name) for r in others}
    pulled_by = {str(r) for r in others if "python-multipart" in brings(r)}
    assert not pulled_by, f"{pulled_by} would install python-multipart"
