"""The HTTP benchmark refuses options it cannot run with before it starts anything."""

import pytest

from benchmarks.serve_http import main


def test_an_unknown_precision_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--precisions", "float32,fp8"])

    assert exit_info.value.code == 2
    assert "--precisions: unknown ['fp8']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--texts", "0"], "argument --texts: must be at least 1, got '0'", id="no-texts"),
        pytest.param(["--clients", "-2"], "argument --clients: must be at least 1, got '-2'", id="no-clients"),
        pytest.param(["--max-wait-ms", "-5"], "--max-wait-ms -5: Input should be greater than or equal to 0", id="neg"),
        pytest.param(["--max-wait-ms", "inf"], "--max-wait-ms inf: Input should be a finite number", id="endless"),
        pytest.param(["--device", "tpu"], "--device tpu: Value error, device must be 'auto', 'cpu'", id="device"),
        pytest.param(
            ["--bulk-size", "300"], "--bulk-size 300: the server takes at most 256 texts a request", id="bulk"
        ),
        pytest.param(["--clients", "100000"], "--clients 100000: the server holds at most 512 connections", id="many"),
    ],
)
def test_options_the_server_would_refuse_are_refused_first(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
