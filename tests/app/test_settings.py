from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import training.precision
from app.engine import model_name
from app.settings import Settings


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
    assert (settings.torch_device, settings.torch_dtype) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(("bfloat16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_defaults_to_bfloat16_where_the_gpu_has_it_else_float16(monkeypatch, bfloat16, expected):
    asked = []
    monkeypatch.setattr(training.precision, "cuda_supports_bfloat16", lambda device: asked.append(device) or bfloat16)
    assert Settings(device="cuda:1").torch_dtype == expected
    assert asked == [torch.device("cuda:1")]
    assert Settings(device="cuda:1", dtype="float16").torch_dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_dtype_follows_the_device():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert Settings(device="cuda").torch_dtype == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"device": "gpu"}, "'gpu'", id="unknown-device"),
        pytest.param({"device": "cpu", "dtype": "float16"}, "not supported on CPU", id="half-on-cpu"),
        pytest.param({"device": "cpu", "dtype": "bfloat16"}, "not supported on CPU", id="bfloat16-on-cpu"),
        pytest.param({"device": "cuda", "quantize_int8": True}, "CPU only", id="int8-on-cuda"),
        pytest.param({"max_batch_size": 0}, "max_batch_size", id="zero-batch"),
        pytest.param({"api_key": ""}, "must not be empty", id="empty-key"),
    ],
)
def test_bad_settings_are_refused_with_the_value(overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


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
