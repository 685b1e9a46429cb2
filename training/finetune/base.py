"""The model fine-tuning starts from, and the one place that downloads weights: a GPT-2-family base from a Hugging
Face repo id or a local directory (its sizes from its config.json, its weights from model.safetensors or a sharded
model.safetensors.index.json), or a preset's size with OpenAI's GPT-2 weights. distilgpt2, OpenAI's four sizes or
a user's own GPT-2: one architecture, any size. Downloads go through huggingface_hub into its cache (HF_HOME),
and HF_HUB_OFFLINE=1 serves them from there without the network. A Hub that does not answer one connection within
HUB_PROBE_SECONDS is treated as offline mode: the cache serves, or the run fails at once instead of retrying.

    model = base_classifier("distilbert/distilgpt2", n_labels=2, vocab_size=50257)
"""

import json
import socket
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from safetensors.torch import load_file

from training.runtime.model import GPTClassifier, GPTConfig, WeightsError, load_hf_gpt2
from training.runtime.tokenizer import file_problem

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
# OpenAI's GPT-2 weights for the presets of their sizes
HF_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# Short names for the repos of the GPT-2 family's published checkpoints
ALIASES = {**HF_REPOS, "distilgpt2": "distilbert/distilgpt2"}
# What our GPTClassifier computes, as GPT2Config spells it: a config that asks for anything else is refused
GPT2_CHOICES = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # GELU, tanh approximation
    "layer_norm_epsilon": (1e-5,),  # torch.nn.LayerNorm's default, which our blocks use
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}
# One TCP connection to the Hub (or the proxy in front of it) must open this fast, else the download is not tried:
# huggingface_hub retries a missing file for a minute and more before it gives up
HUB_PROBE_SECONDS = 3.0


class UnsupportedBase(WeightsError):
    """A base whose config.json asks for computation our model does not do: no choice of --init helps."""


def resolve_base(base: str, weights: bool = True) -> Path:
    """A local directory as given, or the snapshot of a Hugging Face repo (an alias such as "gpt2", or any repo
    id) with only its config.json and (when `weights`) its safetensors files, downloaded into the Hugging Face
    cache. When the Hub does not answer (hub_unreachable), the cache alone serves, as with HF_HUB_OFFLINE=1.

    Raises WeightsError when a download fails (network, offline mode, an unknown repo).
    """
    if Path(base).is_dir():
        return Path(base)
    repo = ALIASES.get(base, base)
    from huggingface_hub import constants, snapshot_download  # honours HF_HUB_OFFLINE and HF_HOME; shows progress

    unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
    try:
        patterns = [CONFIG_FILE, "*.safetensors", INDEX_FILE] if weights else [CONFIG_FILE]
        with offline_mode(unreachable is not None):
            return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # network, offline mode, auth, an unknown repo: all end the same way for the user
        searched = "" if unreachable is None else f" ({unreachable}, so only the cache was searched)"
        raise WeightsError(
            f"could not get {repo!r} from the Hugging Face Hub, nor is it a local directory: {exc}{searched}"
        ) from exc


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """None when a TCP connection to the Hub's endpoint (HF_ENDPOINT), or to the proxy the environment names for
    it, opens within `timeout` seconds; otherwise what failed, naming the address."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        address = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = address.hostname, address.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"the Hub at {constants.ENDPOINT} did not answer via {host}:{port} within {timeout:g} s ({exc})"
    return None


@contextmanager
def offline_mode(on: bool):
    """huggingface_hub's offline mode (HF_HUB_OFFLINE=1) for the duration when `on`: files come from the cache only."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def base_config(directory: Path, n_labels: int, vocab_size: int) -> GPTConfig:
    """Our model config from `directory`/config.json: layers, heads, width, positions and vocabulary.

    `vocab_size` is the tokenizer's; the base's own must hold it (a larger one, padded for speed, is kept).
    Raises WeightsError naming the file when it is missing or not JSON; UnsupportedBase (no choice of --init helps)
    naming what it found: not a GPT-2 config, every option our model does not compute (with what works instead),
    a vocabulary smaller than the tokenizer's, or sizes our model cannot take.
    """
    file = directory / CONFIG_FILE
    if problem := file_problem(file):
        raise WeightsError(f"{file}: {problem}; a base model directory needs config.json and its safetensors")
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        architectures = raw.get("architectures") if isinstance(raw, dict) else None
        raise UnsupportedBase(
            f"{file}: not a GPT-2-family model: model_type {found!r}, architectures {architectures!r} "
            "(expected model_type 'gpt2')"
        )
    unsupported = [
        f"{name} {raw[name]!r} is not supported (supported: {list(allowed)})"
        for name, allowed in GPT2_CHOICES.items()
        if name in raw and raw[name] not in allowed
    ]
    if raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 768)):
        unsupported.append(f"n_inner {raw['n_inner']!r} is not supported (only 4 * n_embd)")
    if unsupported:
        raise UnsupportedBase(
            f"{file}: {'; '.join(unsupported)}. Neither --init pretrained nor --init random can "
            "use this base; what works: a GPT-2 base without these settings (--base gpt2, distilgpt2 or any "
            "openai-community/gpt2* repo), or --preset with --init random --trainable all"
        )
    # GPT2Config's defaults are GPT-2 124M's, for the keys a config leaves out
    sizes = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
    sizes = {name: raw.get(name, default) for name, default in sizes.items()}
    if sizes["vocab_size"] < vocab_size:
        raise UnsupportedBase(
            f"{file}: vocab_size {sizes['vocab_size']} is smaller than the tokenizer's {vocab_size}: the model "
            "could not read every token"
        )
    try:
        return GPTConfig(
            block_size=sizes["n_positions"],
            vocab_size=sizes["vocab_size"],
            n_layer=sizes["n_layer"],
            n_head=sizes["n_head"],
            n_embd=sizes["n_embd"],
            n_labels=n_labels,
        )
    except ValueError as exc:
        raise UnsupportedBase(f"{file}: {exc}") from exc


def base_tensors(directory: Path) -> dict:
    """Every tensor of `directory`/model.safetensors, or of the shards its model.safetensors.index.json names.

    Raises WeightsError naming the file that is missing or unreadable.
    """
    if (directory / WEIGHTS_FILE).exists():
        files = [directory / WEIGHTS_FILE]  # read_tensors refuses one that is not a regular file
    elif (directory / INDEX_FILE).exists():
        if problem := file_problem(directory / INDEX_FILE):
            raise WeightsError(f"{directory / INDEX_FILE}: {problem}")
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{directory / INDEX_FILE}: no readable weight_map ({exc!r})") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise WeightsError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors = {}
    for file in files:
        tensors.update(read_tensors(file))
    return tensors


def read_tensors(file: Path) -> dict:
    """Every tensor of the safetensors `file`. Raises WeightsError naming it when it is missing, not a regular file
    (a FIFO would block the read until something wrote to it) or unreadable."""
    if problem := file_problem(file):
        raise WeightsError(f"{file}: {problem}")
    try:
        return load_file(file)
    except Exception as exc:  # truncation, a header safetensors cannot read
        raise WeightsError(f"{file}: not a readable safetensors file ({exc})") from exc


def base_classifier(base: str, n_labels: int, vocab_size: int, pretrained: bool = True) -> GPTClassifier:
    """A classifier shaped by `base`'s config.json, holding its weights (pretrained) or random ones, with a
    freshly initialised head. `base`: a local directory, a Hugging Face repo id, or an alias (ALIASES).

    Raises WeightsError for a base that cannot be had, is not GPT-2, or whose weights do not fit its config.
    """
    directory = resolve_base(base, weights=pretrained)
    model = GPTClassifier(base_config(directory, n_labels, vocab_size))
    if pretrained:
        load_hf_gpt2(model, base_tensors(directory))
    return model


def weights_file(source: str | Path) -> Path:
    """A local GPT-2 model.safetensors, given as the file or its directory. Raises WeightsError when there is none."""
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if problem := file_problem(path):
        raise WeightsError(f"no GPT-2 weights at {path}: {problem}")
    return path


def pretrained_classifier(config: GPTConfig, preset: str, source: str | Path | None = None) -> GPTClassifier:
    """A classifier of `config` whose transformer holds OpenAI's GPT-2 weights and whose head is freshly initialised:
    from `source` (a local model.safetensors or its directory), else the preset's repo fetched by resolve_base.

    Raises WeightsError for a preset without published weights, a download that fails, a file that is missing or
    unreadable, or weights that do not fit `config`.
    """
    if source is not None:
        tensors = read_tensors(weights_file(source))
    elif preset in HF_REPOS:
        tensors = base_tensors(resolve_base(preset))
    else:
        raise WeightsError(f"preset {preset!r} has no pretrained weights; choose one of {sorted(HF_REPOS)}")
    model = GPTClassifier(config)
    load_hf_gpt2(model, tensors)
    return model
