"""The installed dependencies meet pyproject.toml's floors (several chosen to skip releases with published
advisories), no multipart parser is installed: the API takes JSON only, so a form parser is attack surface
that nothing uses, and the app does not load the train extra."""

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
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


def test_the_app_does_not_import_the_train_extra():
    """Serving needs neither metrics nor plots; a fresh interpreter, as this one may have imported them already."""
    code = "import sys, app.main; print(sorted({'torchmetrics', 'matplotlib'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# Imports an extra satisfies, each imported where used and guarded: the code runs without it.
OPTIONAL_IMPORTS = {"matplotlib": "plots", "tokenizers": "export", "ray": "ray"}


def runtime_closure() -> set[str]:
    """Every distribution a plain install (no extras) brings: the runtime requirements and theirs, transitively."""
    seen, todo = set(), list(RUNTIME)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        extras = requirement.extras or {""}
        for line in distribution(requirement.name).requires or []:
            pulled = Requirement(line)
            if pulled.marker is None or any(pulled.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(pulled)
    return {name for name, _ in seen}


def imported_modules(package: Path) -> dict[str, str]:
    """Top-level names of every absolute import in the package's modules (at any depth), with one place each."""
    found = {}
    for file in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], f"{file.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("package", ["training", "app"])
def test_every_import_is_a_runtime_dependency(package):
    """A plain install can run the package: no module of it imports what only an extra or a test dependency
    installs (the kind of matplotlib or yaml imported where a plain install runs)."""
    root = Path(__file__).resolve().parents[1]
    installs = importlib.metadata.packages_distributions()
    closure = runtime_closure()
    missing = {
        module: place
        for module, place in imported_modules(root / package).items()
        if module not in sys.stdlib_module_names
        and module not in ("training", "app", *OPTIONAL_IMPORTS)
        and not {canonicalize_name(d) for d in installs.get(module, [])} & closure
    }
    assert missing == {}, f"imported, but not installed by `pip install .`: {missing}"


def test_optional_imports_come_from_their_extra():
    closure = runtime_closure()
    for module, extra in OPTIONAL_IMPORTS.items():
        assert canonicalize_name(module) not in closure, f"{module} is a runtime dependency now: drop it here"
        assert module in {canonicalize_name(Requirement(line).name) for line in PROJECT["optional-dependencies"][extra]}
