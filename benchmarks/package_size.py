"""What the data shipped in the package (training/assets) and the offline API pages (fastapi-offline) add to the
wheel and to the image.

    python -m benchmarks.package_size

Builds the wheel of this tree (`pip wheel --no-deps`), then writes it again twice with the same zip settings, with
and without training/assets: the difference is what the assets add to the wheel. Installed, they add their own
size. The image is estimated, not built (no Docker engine where this ran): the files that `pip install .` puts into
its venv for the assets and for fastapi-offline (as installed in this environment), by their apparent sizes.
"""

import importlib.metadata
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.common import ROOT, print_table, write_result

ASSETS = "training/assets/"


def rezipped_size(wheel: zipfile.ZipFile, keep) -> int:
    """Bytes of a zip holding the wheel's entries for which keep(name), each deflated as bdist_wheel does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for info in wheel.infolist():
            if keep(info.filename):
                out.writestr(info, wheel.read(info))
    return len(buffer.getvalue())


def installed_size(distribution: str) -> int:
    """Apparent bytes of the files an installed distribution lists in its RECORD."""
    files = importlib.metadata.files(distribution) or []
    return sum(Path(f.locate()).stat().st_size for f in files if Path(f.locate()).is_file())


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", out],
            check=True,
        )
        (path,) = Path(out).glob("spamgpt-*.whl")
        wheel_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as wheel:
            assets = {i.filename: i.file_size for i in wheel.infolist() if i.filename.startswith(ASSETS)}
            with_assets = rezipped_size(wheel, lambda name: True)
            without_assets = rezipped_size(wheel, lambda name: not name.startswith(ASSETS))
    rows = [{"file": name, "installed_bytes": size} for name, size in sorted(assets.items())]
    docs_bytes = installed_size("fastapi-offline")
    result = {
        "wheel_bytes": wheel_bytes,
        "wheel_bytes_added_by_assets": with_assets - without_assets,
        "assets_installed_bytes": sum(assets.values()),
        "assets": rows,
        "fastapi_offline_version": importlib.metadata.version("fastapi-offline"),
        "fastapi_offline_installed_bytes": docs_bytes,
        "image_bytes_added_estimate": sum(assets.values()) + docs_bytes,
        "note": "image: an estimate from installed file sizes (no Docker engine here); wheel: measured",
    }
    print_table(rows)
    print_table(
        [
            {"what": "wheel (measured)", "bytes": wheel_bytes},
            {"what": "  of which training/assets", "bytes": result["wheel_bytes_added_by_assets"]},
            {"what": "training/assets installed", "bytes": result["assets_installed_bytes"]},
            {"what": f"fastapi-offline {result['fastapi_offline_version']} installed", "bytes": docs_bytes},
            {"what": "image, added (estimate)", "bytes": result["image_bytes_added_estimate"]},
        ]
    )
    print(f"written to {write_result('package_size', result)}")


if __name__ == "__main__":
    main()
