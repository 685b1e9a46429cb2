"""SPAMGPT_* settings. Nothing about the model lives here: sizes, labels and max tokens come from the checkpoint."""

import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from training.runtime.options import MAX_THREADS, ClassifierOptions, too_many_threads

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# The classifier's defaults are file scoring's too: one definition, in training.runtime.options
DEFAULTS = {f.name: f.default for f in fields(ClassifierOptions)}


@dataclass(frozen=True)
class BatchLimits:
    """What bounds the micro-batcher's batches and queue (app.batcher.Batcher): the settings of the same names
    (Settings, where each one's trade-off is given), which /info reports as they are."""

    batching: bool  # False: every request is a batch of its own; True: concurrent requests' texts share batches
    max_batch_size: int  # texts per forward pass, >= 1
    max_batch_tokens: int  # padded tokens (rows x longest row) per forward pass, >= 1
    max_wait_ms: float  # milliseconds a batch waits for more texts, from its oldest text's arrival, >= 0
    max_queue_texts: int  # texts waiting for the model, >= 1; a request that does not fit is refused whole
    request_timeout_s: float  # seconds a request's texts may wait before it is refused and they are dropped, > 0


class Settings(BaseSettings):
    """One server's settings, from SPAMGPT_<NAME> variables unless given. Validation raises pydantic's
    ValidationError naming the setting and showing its value."""

    model_config = SettingsConfigDict(env_prefix="SPAMGPT_")

    checkpoint_dir: Path = Path("checkpoints/spamgpt")
    # "auto": cuda, then mps, then cpu (training.runtime.device.resolve_device, the rule of every command).
    device: str = DEFAULTS["device"]
    # "auto": float32 on CPU (even where bfloat16 is native: see training.runtime.precision.resolve_dtype); on CUDA
    # bfloat16 where the GPU computes it natively (float32's range: GPT-2's large activations cannot overflow it),
    # else float16. "bfloat16" on CPU only where the CPU computes it natively
    # (training.runtime.precision.check_precision).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = DEFAULTS["dtype"]
    # CPU only: int8 weights for every nn.Linear. Faster and 4x smaller; probabilities move by ~1e-2.
    quantize_int8: bool = DEFAULTS["quantize_int8"]
    # Binary models: the share of spam (the threshold's label) this deployment expects; probabilities are corrected
    # from the checkpoint's prior to it (Bayes' rule on the logits) and decisions stay as chosen. Unset: the
    # checkpoint's prior, the source data's rate. /info states the prior in force.
    prior: float | None = Field(DEFAULTS["prior"], gt=0, lt=1)
    # torch intra-op threads; 0 keeps torch's default (all cores). Fewer leaves cores for tokenizing and HTTP.
    torch_threads: int = Field(DEFAULTS["threads"], ge=0)

    # False: every request is its own batch (the benchmark's baseline); True merges concurrent requests.
    batching: bool = True
    # Texts per forward pass: larger raises throughput until the device saturates, and raises latency.
    max_batch_size: int = Field(DEFAULTS["batch_size"], ge=1)
    # Padded tokens (rows x longest row) per forward pass: bounds activation memory when texts are long.
    max_batch_tokens: int = Field(DEFAULTS["max_batch_tokens"], ge=1)
    # How long a batch waits for more texts: fuller batches under load, up to this much latency when idle.
    max_wait_ms: float = Field(2.0, ge=0, allow_inf_nan=False)
    # Texts waiting for the model: more absorbs bursts, fewer bounds memory and the wait before a 429.
    max_queue_texts: int = Field(2048, ge=1)
    # Seconds a request's texts may wait in the queue before it is answered 504 and they are dropped unrun (once
    # one has started, the request runs to the end). Shorter sheds load sooner, so clients retry elsewhere instead
    # of waiting on an overloaded replica; longer rides out bursts that would otherwise fail. Below the clients'
    # own timeouts, they get a clear 504 rather than a timeout of their own.
    request_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    # Texts in one request: larger saves round trips, smaller keeps one client from filling the queue.
    max_texts_per_request: int = Field(256, ge=1)
    # Characters per text, checked before tokenizing so a huge string cannot eat CPU. GPT-2 contexts end
    # at 1024 tokens (~4,000 characters of English), so longer texts would only be truncated anyway.
    max_text_chars: int = Field(20_000, ge=1)
    # Bytes of one raw message (/classify's `messages`, after base64; a message/rfc822 body, which max_body_bytes
    # bounds too), checked before it is parsed. Larger admits mail with bigger attachments, which are never decoded
    # and whose bytes past the first MiB are not read (training.runtime.mail.Extraction.max_bytes); smaller holds
    # less memory per request and refuses big mail (422 in a list, 413 as a body) instead of reading its start.
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1)
    # How a message longer than max_tokens is read (training.runtime.mail.WINDOW_RULES): "first" its first
    # max_tokens tokens, "mean" or "max" over its windows of max_tokens tokens; every window is a text in the
    # batches and the queue (max_queue_texts), so a long message costs up to mail_max_windows texts.
    mail_windows: Literal["first", "mean", "max"] = DEFAULTS["mail_windows"]
    mail_max_windows: int = Field(DEFAULTS["mail_max_windows"], ge=1)
    # Request body bytes, counted as they arrive before any parsing: bounds memory per request.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    # Slow and stalled clients. Seconds a request may take to arrive whole, headers and body, from
    # its first byte (and a new connection to send a whole first request): a slower one is answered 408 and closed.
    # Longer lets slow links send large bodies (4 MiB in 10 s needs about 3.4 Mbit/s); shorter frees the memory
    # and connection slots of stalled clients sooner.
    request_arrival_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    # Body bytes held at once by all requests, from their first byte until they are answered: a request whose body
    # would pass it is refused at once with 429. Bounds the memory that many slow or stalled uploads can pin (at
    # most this plus uvicorn's 64 KiB read buffer per connection); larger admits more large requests at once.
    max_body_bytes_in_flight: int = Field(32 * 1024 * 1024, ge=1)
    # Open connections (and running requests) beyond which `python -m app` has uvicorn answer 503 to new requests
    # (its --limit-concurrency): bounds sockets and per-connection memory; larger admits more concurrent clients.
    max_connections: int = Field(512, ge=1)

    # Seconds after SIGTERM during which the server still accepts and serves while /health answers 503 "draining",
    # before it stops accepting and finishes what is in flight: long enough for load balancers to see the 503 and
    # for Kubernetes to take the pod out of its Services (a few seconds), short enough that this plus uvicorn's
    # --timeout-graceful-shutdown (20 s in the image) fits the orchestrator's grace period (Kubernetes: 30 s).
    drain_delay_s: float = Field(5.0, ge=0, allow_inf_nan=False)

    # When set, /classify and /info need "Authorization: Bearer <key>" or "X-API-Key: <key>".
    # /health and /metrics stay open for load balancers and scrapers; /docs shows no data.
    api_key: SecretStr | None = None
    # The name in responses; default derived from the checkpoint, e.g. "spamgpt-gpt2-124m".
    model_name: str | None = None

    # Several models (app.models; docs/serving.md, "Several classifiers on one base"), instead of checkpoint_dir.
    # A directory whose every subdirectory is a checkpoint served under its folder's name (folders whose name
    # starts with "." are skipped: a place to copy a checkpoint into before renaming it in).
    models_dir: Path | None = None
    # Checkpoints by name, "name=path,name=path", beside models_dir's or instead of them. A list, not a JSON
    # object: a name given twice is refused rather than the last one silently winning.
    models: str | None = None
    # The model that requests naming none get; unset: the only model there is (with several, it must be set).
    default_model: str | None = None

    # The spamd-protocol listener (app.spamd), for spamc, Exim, Haraka and Rspamd's spamassassin service. Its port;
    # unset: no listener. Off by default: it has no API key (spamd's protocol carries none), only spamd_allowed_ips.
    spamd_port: int | None = Field(None, ge=1, le=65535)
    # Its address: loopback by default, as spamd's, so only this machine's MTA reaches it; 0.0.0.0 opens it to the
    # networks spamd_allowed_ips admits.
    spamd_host: str = "127.0.0.1"
    # Clients allowed to connect, as spamd's --allowed-ips: addresses or networks, comma-separated. Others are
    # answered EX_NOPERM and closed. Wider admits more MTAs; each one admitted can use the model and its queue.
    spamd_allowed_ips: Annotated[list[IPvAnyNetwork], NoDecode] = ["127.0.0.0/8", "::1/128"]
    # TELL (learning from a user's correction) refused unless true, as spamd's --allow-tell: a client that may TELL
    # writes into the feedback store that the next fine-tune reads.
    spamd_allow_tell: bool = False
    # Clients whose TELL is taken when spamd_allow_tell is true: addresses or networks, comma-separated. Narrower
    # than spamd_allowed_ips where only some hosts (the mail admin's) may teach the model.
    spamd_tell_allowed_ips: Annotated[list[IPvAnyNetwork], NoDecode] = ["127.0.0.0/8", "::1/128"]
    # The `required` score clients see, and the score a message exactly on the model's threshold gets (score =
    # required + log-odds of P(spam) - log-odds of the threshold: docs/mailserver.md). SpamAssassin's 5.0 keeps an
    # MTA's required_score habits; the decisions are the model's whatever the value.
    spamd_required_score: float = Field(5.0, ge=-100, le=100)
    # Open spamd connections; the next one is answered EX_TEMPFAIL (the MTA retries later) and closed. With
    # max_message_bytes (one message, after zlib decompression too, as on HTTP) it bounds the memory spamd clients
    # can pin: 32 x 4 MiB by default. More admits more MTA processes scanning at once.
    spamd_max_connections: int = Field(32, ge=1)

    # Corrections users report (POST /feedback; spamd's TELL) go to an SQLite file that finetune reads as data
    # (docs/feedback.md). Off: /feedback answers 403 and nothing is written; on: reports need the API key when one
    # is set, and each is acknowledged only once it is on disk.
    feedback_enabled: bool = False
    # The feedback database, created with its directory when missing. On a local disk: SQLite's write-ahead log
    # needs shared memory that network filesystems do not give. One file per server: replicas writing one file
    # over a shared volume would corrupt it; give each its own and merge them as data (docs/feedback.md).
    feedback_path: Path = Path("feedback/feedback.db")

    # Log lines: "text" (uvicorn's own) or "json", one JSON object a line for cluster log collectors, with one
    # line per request carrying its id (app.edge.request_log). Every response carries X-Request-ID either way.
    log_format: Literal["text", "json"] = "text"

    @field_validator("checkpoint_dir", "models_dir", mode="before")
    @classmethod
    def _named_directory(cls, value: object, info: ValidationInfo) -> object:
        # Path("") is the current directory: an empty variable would serve whatever the server was started in
        if isinstance(value, str) and not value.strip():
            example = "checkpoints/spamgpt" if info.field_name == "checkpoint_dir" else "models"
            raise ValueError(f"{info.field_name} must not be empty: name a directory, e.g. {example}")
        return value

    @field_validator("feedback_path", mode="before")
    @classmethod
    def _named_file(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("feedback_path must not be empty: name a file, e.g. feedback/feedback.db")
        return value

    @field_validator("torch_threads")
    @classmethod
    def _threads_within_the_bound(cls, value: int) -> int:
        if value > MAX_THREADS:
            raise ValueError(too_many_threads("torch_threads", value))
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
        return value

    @field_validator("spamd_host")
    @classmethod
    def _named_host(cls, value: str) -> str:
        # an empty host would listen on every interface
        if not value.strip():
            raise ValueError("spamd_host must not be empty: name an address, e.g. 127.0.0.1 (0.0.0.0 for all)")
        return value

    @field_validator("spamd_allowed_ips", "spamd_tell_allowed_ips", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # "127.0.0.1, 10.0.0.0/8" from the environment, as spamd's --allowed-ips takes them
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")
        return value

    @field_validator("model_name")
    @classmethod
    def _non_empty_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("model_name must not be empty (leave it unset for the checkpoint's own name)")
        return value

    @field_validator("models")
    @classmethod
    def _named_checkpoints(cls, value: str | None) -> str | None:
        if value is not None:
            named_checkpoints(value)  # raises ValueError naming what is wrong
        return value

    @field_validator("default_model")
    @classmethod
    def _model_name_form(cls, value: str | None) -> str | None:
        if value is not None:
            check_model_name(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> "Settings":
        if self.models_dir is not None or self.models is not None:
            single = [name for name in ("checkpoint_dir", "model_name") if name in self.model_fields_set]
            if single:
                raise ValueError(
                    f"{' and '.join(single)} name one model and cannot be combined with models_dir or models: "
                    "put that checkpoint in models_dir, or list it in models as name=path"
                )
        return self

    def model_sources(self) -> list[tuple[str | None, Path]]:
        """The checkpoints to serve, by name: `models` in their order, then models_dir's subdirectories by name;
        without either, checkpoint_dir under model_name (None: the name is derived from the checkpoint). A
        directory that cannot be read is one source whose loading then fails.

        Raises ValueError, naming the SPAMGPT_* variables, for a name given twice (in `models` and as a folder of
        models_dir) and for a default_model check_default_model refuses. A folder whose name cannot name a model
        (check_model_name) is a source like any other, refused when it is loaded."""
        if self.models_dir is None and self.models is None:
            return [(self.model_name, self.checkpoint_dir)]
        sources = named_checkpoints(self.models) if self.models else []
        if self.models_dir is not None and self.models_dir.is_dir():
            sources += [(d.name, d) for d in sorted(self.models_dir.iterdir()) if d.is_dir() and d.name[0] != "."]
        seen: dict[str, Path] = {}
        for name, path in sources:
            if name in seen:
                raise ValueError(
                    f"{variable('models')}={self.models!r} and {variable('models_dir')}={str(self.models_dir)!r}: "
                    f"two models named {name!r} ({str(seen[name])!r} and {str(path)!r}); rename one"
                )
            seen[name] = path
        if sources:
            check_default_model(list(seen), self.default_model)
        return sources

    @model_validator(mode="after")
    def _a_lone_text_runs_before_its_deadline(self) -> "Settings":
        if self.max_wait_ms >= 1000 * self.request_timeout_s:
            raise ValueError(
                f"max_wait_ms ({self.max_wait_ms:g}) must be below request_timeout_s ({self.request_timeout_s:g} s), "
                "or a text arriving alone would wait for company past its deadline and never run"
            )
        return self

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> "Settings":
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or a request of the allowed size could never be received"
            )
        return self

    @model_validator(mode="after")
    def _classifier_options_are_valid(self) -> "Settings":
        self.classifier_options()  # validates them by the rules file scoring follows too
        return self

    def classifier_options(self) -> ClassifierOptions:
        """How the checkpoint is loaded and run (training.runtime.options.ClassifierOptions), from these settings.

        Raises ValueError for precision options the device cannot run (training.runtime.precision.check_precision).
        """
        return ClassifierOptions(
            device=self.device,
            dtype=self.dtype,
            quantize_int8=self.quantize_int8,
            threads=self.torch_threads,
            batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            prior=self.prior,
            mail_windows=self.mail_windows,
            mail_max_windows=self.mail_max_windows,
        )

    def batch_limits(self) -> BatchLimits:
        """The micro-batcher's limits (app.batcher.BatchLimits), which /info reports too."""
        return BatchLimits(**{f.name: getattr(self, f.name) for f in fields(BatchLimits)})


# A model's name, as it appears in URLs (/models/{name}/predict) and metric labels: a letter or digit, then letters,
# digits, ".", "_" or "-", at most 64 characters
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_model_name(name: str) -> str:
    """`name` if it can name a model (MODEL_NAME); else ValueError showing it."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_default_model(names: list[str | None], default: str | None) -> None:
    """Raises ValueError naming SPAMGPT_DEFAULT_MODEL when `default` is not among `names` (the models to serve), or
    unset while there are several: requests that name no model would have none to answer them."""
    setting = variable("default_model")
    if default is None and len(names) > 1:
        raise ValueError(f"{setting} unset: {len(names)} models {names}; set it to the one requests naming none get")
    if default is not None and default not in names:
        raise ValueError(f"{setting}={default!r}: no model of that name; the models are {names}")


def named_checkpoints(value: str) -> list[tuple[str, Path]]:
    """ "spam=/ckpt/spam,phishing=/ckpt/phishing" -> [("spam", Path("/ckpt/spam")), ...] in their order.

    Raises ValueError for an entry without "=", an empty path, a name MODEL_NAME refuses or a name given twice."""
    pairs: list[tuple[str, Path]] = []
    for entry in value.split(","):
        name, sep, path = (part.strip() for part in entry.partition("="))
        if not sep or not path:
            raise ValueError(f"each entry must be name=path, got {entry.strip()!r}")
        check_model_name(name)
        if name in dict(pairs):
            raise ValueError(f"model {name!r} given twice")
        pairs.append((name, Path(path)))
    return pairs


class SettingsError(ValueError):
    """SPAMGPT_* variables that cannot be used; its message has one line per refused variable (or group of
    variables that contradict each other), naming it, its value and what would work."""


def settings_from_environment() -> Settings:
    """Settings from the SPAMGPT_* variables, as Settings() reads them.

    Raises SettingsError naming the variables rather than pydantic's field names, without pydantic's report.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError("\n".join(refusal(error) for error in exc.errors(include_url=False))) from None


def variable(name: str) -> str:
    """The environment variable of the setting `name`: max_batch_size -> SPAMGPT_MAX_BATCH_SIZE."""
    return f"{Settings.model_config['env_prefix']}{name.upper()}"


def refusal(error: dict) -> str:
    """One pydantic error as one line: `SPAMGPT_NAME='value': what is wrong (what would work)`. An error of the whole
    model (settings that contradict each other) names each variable its message mentions that the environment sets."""
    reason = error["msg"].removeprefix("Value error, ").replace("Input should", "should")
    reason = re.sub(r"\b(" + "|".join(Settings.model_fields) + r")\b", lambda m: variable(m.group(1)), reason)
    if error["loc"]:
        name = error["loc"][0]
        shown = f"{variable(name)}={_shown(error['input'])}"
        reason = reason.removeprefix(f"{variable(name)} ")
        hint = _what_works(name) if error["type"] != "value_error" else None
        return f"{shown}: {reason}" + (f" (use {hint})" if hint else "")
    environment = {key.upper(): value for key, value in os.environ.items()}
    mentioned = [name for name in Settings.model_fields if re.search(rf"\b{variable(name)}\b", reason)]
    given = [name for name in mentioned if variable(name) in environment] or mentioned
    shown = ", ".join(f"{variable(name)}={_shown(environment.get(variable(name)))}" for name in given)
    return f"{shown}: {reason}"


def _shown(value: object) -> str:
    """The value as the line shows it: quoted, or "unset"."""
    return "unset" if value is None else repr(str(value))


BOUND_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _what_works(name: str) -> str | None:
    """The values the setting `name` takes, from its type and bounds: "an integer >= 1", "true or false"; None
    where pydantic's own message lists them (a Literal)."""
    field = Settings.model_fields[name]
    kinds = [kind for kind in typing.get_args(field.annotation) if kind is not types.NoneType] or [field.annotation]
    kind = kinds[0]
    optional = ", or leave it unset" if len(typing.get_args(field.annotation)) > len(kinds) else ""
    if kind is bool:
        return "true or false"
    if kind in (int, float):
        bounds = [
            f"{BOUND_WORDS[attr]} {getattr(limit, attr)}"
            for limit in field.metadata
            for attr in BOUND_WORDS
            if getattr(limit, attr, None) is not None
        ]
        return f"{'an integer' if kind is int else 'a number'} {' and '.join(bounds)}".rstrip() + optional
    return None
