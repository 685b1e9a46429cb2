"""The engine benchmark checks its arguments before it times anything."""

import time

import pytest

import benchmarks.serve_engine
from benchmarks.serve_engine import main


def test_a_quality_checkpoint_without_its_split_is_refused_before_anything_is_timed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmarks.serve_engine, "load_contenders", pytest.fail)  # must not be reached
    (tmp_path / "config.json").write_text("{}")
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["--quality-checkpoint", str(tmp_path)])
    assert exit_info.value.code == 2 and time.monotonic() - started < 5
    assert f"--quality-checkpoint {str(tmp_path)!r} is not a trained checkpoint: no report/split.json" in (
        capsys.readouterr().err
    )
