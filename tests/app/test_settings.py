import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import training.runtime.precision
from app.models import model_name
from app.settings import Settings, SettingsError, settings_from_environment
from tests.helpers import pretend_cpu
from training.runtime.options import MAX_THREADS


def test_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPAMGPT_CHECKPOINT_DIR", "/models/spam")
    monkeypatch.setenv("SPAMGPT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SPAMGPT_BATCHING", "false")
    monkeypatch.setenv("SPAMGPT_API_KEY", "s3cret")
    settings = Settings()
    assert settings.checkpoint_dir == Path("/models/spam")
    assert settings.max_batch_size == 7
    assert settings.batching is False
    assert settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_cpu_defaults_to_float32():
    settings = Settings(device="cpu")
    options = settings.classifier_options()
    assert (options.torch_device, options.torch_dtype) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(("bfloat16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_defaults_to_bfloat16_where_the_gpu_has_it_else_float16(monkeypatch, bfloat16, expected):
    asked = []
    monkeypatch.setattr(
        training.runtime.precision, "cuda_supports_bfloat16", lambda device: asked.append(device) or bfloat16
    )
    assert Settings(device="cuda:1").classifier_options().torch_dtype == expected
    assert asked == [torch.device("cuda:1")]
    assert Settings(device="cuda:1", dtype="float16").classifier_options().torch_dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_dtype_follows_the_device():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert Settings(device="cuda").classifier_options().torch_dtype == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"device": "gpu"}, "'gpu'", id="unknown-device"),
        pytest.param({"device": "cpu", "dtype": "float16"}, "not supported on CPU", id="half-on-cpu"),
        pytest.param({"device": "cuda", "quantize_int8": True}, "CPU only", id="int8-on-cuda"),
        pytest.param({"max_batch_size": 0}, "max_batch_size", id="zero-batch"),
        pytest.param({"api_key": ""}, "must not be empty", id="empty-key"),
    ],
)
def test_bad_settings_are_refused_with_the_value(overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_bfloat16_on_a_cpu_that_would_emulate_it_is_refused_naming_the_missing_feature(monkeypatch):
    pretend_cpu(monkeypatch, "avx2", "fma", "avx512f", "avx512_vnni")
    with pytest.raises(ValidationError, match=r"needs native bfloat16 \(CPU flag avx512_bf16 or amx_bf16\).*Test CPU"):
        Settings(device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_bfloat16_on_a_cpu_that_has_it_natively_is_taken_and_auto_stays_float32(monkeypatch, flag):
    pretend_cpu(monkeypatch, "avx2", flag)
    assert Settings(device="cpu", dtype="bfloat16").classifier_options().torch_dtype == torch.bfloat16
    assert Settings(device="cpu").classifier_options().torch_dtype == torch.float32
    with pytest.raises(ValidationError, match="quantize_int8 quantizes a float32 model, got dtype 'bfloat16'"):
        Settings(device="cpu", dtype="bfloat16", quantize_int8=True)


@pytest.mark.parametrize(
    ("base", "parameters", "expected"),
    [
        pytest.param("gpt2", 124_441_346, "spamgpt-gpt2-124m", id="gpt2"),
        pytest.param("openai-community/gpt2-medium", 354_825_218, "spamgpt-gpt2-medium-355m", id="hub-id"),
        pytest.param("gpt2-xl", 1_557_611_200, "spamgpt-gpt2-xl-1.56b", id="billions"),
    ],
)
def test_model_name_from_base_model_and_size(base, parameters, expected):
    assert model_name(base, parameters) == expected


# One value each setting refuses, as its SPAMGPT_ variable would give it, and what the refusal must say it takes
BAD_VALUES = {
    "checkpoint_dir": ("", "must not be empty"),
    "device": ("gpu", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "dtype": ("half", "'auto', 'float32', 'float16' or 'bfloat16'"),
    "quantize_int8": ("maybe", "true or false"),
    "prior": ("1.5", "a number > 0 and < 1, or leave it unset"),
    "torch_threads": ("-1", "an integer >= 0"),
    "batching": ("yes please", "true or false"),
    "max_batch_size": ("0", "an integer >= 1"),
    "max_batch_tokens": ("1e3", "an integer >= 1"),
    "max_wait_ms": ("-0.5", "a number >= 0"),
    "max_queue_texts": ("0", "an integer >= 1"),
    "request_timeout_s": ("0", "a number > 0"),
    "max_texts_per_request": ("-3", "an integer >= 1"),
    "max_text_chars": ("many", "an integer >= 1"),
    "max_message_bytes": ("0", "an integer >= 1"),
    "mail_windows": ("all", "'first', 'mean' or 'max'"),
    "mail_max_windows": ("0", "an integer >= 1"),
    "max_body_bytes": ("0", "an integer >= 1"),
    "request_arrival_timeout_s": ("inf?", "a number > 0"),
    "max_body_bytes_in_flight": ("1", "at least SPAMGPT_MAX_BODY_BYTES (4194304)"),
    "max_connections": ("0", "an integer >= 1"),
    "drain_delay_s": ("-1", "a number >= 0"),
    "api_key": ("", "leave it unset to disable authentication"),
    "model_name": (" ", "leave it unset for the checkpoint's own name"),
    "spamd_port": ("70000", "an integer >= 1 and <= 65535, or leave it unset"),
    "spamd_host": ("", "must not be empty"),
    "spamd_allowed_ips": ("10.0.0.0/33", "not a valid IPv4 or IPv6 network"),
    "spamd_allow_tell": ("perhaps", "true or false"),
    "spamd_tell_allowed_ips": ("localhost", "not a valid IPv4 or IPv6 network"),
    "spamd_required_score": ("1e9", "a number >= -100 and <= 100"),
    "spamd_max_connections": ("0", "an integer >= 1"),
    "feedback_enabled": ("on-ish", "true or false"),
    "feedback_path": (" ", "must not be empty"),
    "models_dir": ("", "must not be empty"),
    "models": ("spam=a,spam=b", "model 'spam' given twice"),
    "default_model": ("my model", "1 to 64 letters, digits"),
    "log_format": ("xml", "'text' or 'json'"),
}


def test_every_setting_has_a_bad_value_below():
    assert set(BAD_VALUES) == set(Settings.model_fields)


@pytest.mark.parametrize(("name", "value", "works"), [pytest.param(n, *v, id=n) for n, v in BAD_VALUES.items()])
def test_a_bad_variable_is_refused_in_one_line_naming_it_its_value_and_what_works(monkeypatch, name, value, works):
    monkeypatch.setenv(f"SPAMGPT_{name.upper()}", value)
    with pytest.raises(SettingsError) as refused:
        settings_from_environment()
    (line,) = str(refused.value).splitlines()
    assert line.startswith(f"SPAMGPT_{name.upper()}={value!r}: "), line
    assert works in line, line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("1.5", "should be less than 1", id="above-1"),
        pytest.param("0", "should be greater than 0", id="zero"),
        pytest.param("-0.1", "should be greater than 0", id="negative"),
        pytest.param("abc", "should be a valid number", id="not-a-number"),
    ],
)
def test_a_prior_outside_0_1_names_the_variable_and_the_range(monkeypatch, value, message):
    monkeypatch.setenv("SPAMGPT_PRIOR", value)
    with pytest.raises(SettingsError, match="^" + re.escape(f"SPAMGPT_PRIOR={value!r}: {message}")) as refused:
        settings_from_environment()
    assert str(refused.value).endswith("(use a number > 0 and < 1, or leave it unset)")


def test_contradicting_variables_name_the_ones_set(monkeypatch):
    monkeypatch.setenv("SPAMGPT_DEVICE", "cuda")
    monkeypatch.setenv("SPAMGPT_QUANTIZE_INT8", "true")
    with pytest.raises(SettingsError) as refused:
        settings_from_environment()
    assert str(refused.value) == (
        "SPAMGPT_DEVICE='cuda', SPAMGPT_QUANTIZE_INT8='true': SPAMGPT_QUANTIZE_INT8 runs on CPU only, got "
        "SPAMGPT_DEVICE 'cuda'; use SPAMGPT_DTYPE float16 on CUDA"
    )


def test_every_refused_variable_gets_its_line(monkeypatch):
    monkeypatch.setenv("SPAMGPT_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("SPAMGPT_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError) as refused:
        settings_from_environment()
    assert [line.split("=")[0] for line in str(refused.value).splitlines()] == [
        "SPAMGPT_MAX_BATCH_SIZE",
        "SPAMGPT_LOG_FORMAT",
    ]


def test_spamd_allowed_ips_are_read_comma_separated_as_spamd_takes_them(monkeypatch):
    monkeypatch.setenv("SPAMGPT_SPAMD_ALLOWED_IPS", "10.0.0.1, 192.168.0.0/16,::1")
    assert [str(n) for n in Settings().spamd_allowed_ips] == ["10.0.0.1/32", "192.168.0.0/16", "::1/128"]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        pytest.param(
            {"SPAMGPT_MAX_WAIT_MS": "inf"}, "SPAMGPT_MAX_WAIT_MS='inf': should be a finite number", id="infinite-wait"
        ),
        pytest.param(
            {"SPAMGPT_REQUEST_TIMEOUT_S": "Infinity"},
            "SPAMGPT_REQUEST_TIMEOUT_S='Infinity': should be a finite number",
            id="infinite-timeout",
        ),
        pytest.param(
            {"SPAMGPT_MAX_WAIT_MS": "5000", "SPAMGPT_REQUEST_TIMEOUT_S": "5"},
            "SPAMGPT_MAX_WAIT_MS='5000', SPAMGPT_REQUEST_TIMEOUT_S='5': SPAMGPT_MAX_WAIT_MS (5000) must be below "
            "SPAMGPT_REQUEST_TIMEOUT_S (5 s), or a text arriving alone would wait for company past its deadline and "
            "never run",
            id="wait-past-the-deadline",
        ),
        pytest.param(
            {"SPAMGPT_TORCH_THREADS": "100000"},
            "SPAMGPT_TORCH_THREADS='100000': must be at most 1024 (more threads than CPUs only contend), got 100000",
            id="threads-past-any-cpu",
        ),
    ],
)
def test_values_that_would_hang_or_crash_the_server_are_refused(monkeypatch, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        settings_from_environment()
    assert str(refused.value).startswith(message), str(refused.value)


def test_threads_up_to_the_bound_are_taken_whatever_this_machine_has(monkeypatch):
    # a manifest for a larger node is checked on smaller machines (CI): the bound does not depend on this one
    monkeypatch.setenv("SPAMGPT_TORCH_THREADS", str(MAX_THREADS))
    assert settings_from_environment().torch_threads == MAX_THREADS
