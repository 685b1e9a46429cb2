"""The HTTP benchmark refuses an engine precision it does not know before it starts anything."""

import pytest

from benchmarks.serve_http import main


def test_an_unknown_precision_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--precisions", "float32,fp8"])

    assert exit_info.value.code == 2
    assert "--precisions: unknown ['fp8']" in capsys.readouterr().err
