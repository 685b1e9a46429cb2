"""GPT-2 as a sequence classifier, in one readable file (nanoGPT's layout and parameter names).

The classifier reads the hidden state at each row's last real token: batches are right-padded, and
causal attention means a row's real tokens never see its padding, so no attention mask is needed
and a row's logits cannot depend on what it was batched with.
"""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide evenly
    n_embd: int = 768  # width of the residual stream
    n_labels: int = 2  # classes the head scores (ham, spam for the SMS data)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{f.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd!r} is not divisible by n_head {self.n_head!r}")
        if self.n_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got n_labels={self.n_labels!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # tests only
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v fused, as GPT-2 stores them
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); given lengths, only each row's last real token queries: -> (B, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))  # (B, nh, T, hs)
        if lengths is None:
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        q = last_token_hidden(q, lengths).view(B, self.n_head, 1, C // self.n_head)
        real = (torch.arange(T, device=x.device) < lengths.to(x.device)[:, None]).view(B, 1, 1, T)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=real).view(B, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # a module, so that serving can fuse it into c_fc
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); given lengths, only at each row's last real token: -> (B, C)."""
        residual = x if lengths is None else last_token_hidden(x, lengths)
        x = residual + self.attn(self.ln_1(x), lengths)
        return x + self.mlp(self.ln_2(x))


def last_token_hidden(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states of a right-padded batch -> (B, C) at each row's last real token."""
    assert lengths.min() >= 1 and lengths.max() <= h.size(1), "lengths must lie in 1..T"
    return h[torch.arange(h.size(0), device=h.device), lengths.to(h.device) - 1]


class GPTClassifier(nn.Module):
    """GPT-2 blocks, then the final LayerNorm and Linear(n_embd, n_labels) at the last real token.

    The 50,257-wide LM head is not part of the classifier. `prefix` and `suffix` split the forward
    pass so that training can run a frozen prefix once and cache it.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.score = nn.Linear(config.n_embd, config.n_labels)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def prefix(self, idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) residual stream after the embeddings and the first n_blocks."""
        T = idx.size(1)
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h[:n_blocks]:
            x = block(x)
        return x

    def suffix(self, x: torch.Tensor, lengths: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """(B, T, C) after the first n_blocks -> (B, n_labels) logits at each row's last real token.

        Only the last real token is read, so the final block computes only there (its keys and values still
        cover every token): the same logits for about a twelfth less work in GPT-2 124M.
        """
        blocks = self.transformer.h[n_blocks:]
        for block in blocks[:-1]:
            x = block(x)
        x = blocks[-1](x, lengths) if len(blocks) else last_token_hidden(x, lengths)  # (B, C)
        return self.score(self.transformer.ln_f(x))

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded token ids and (B,) real lengths -> (B, n_labels) logits."""
        return self.suffix(self.prefix(idx, 0), lengths, 0)


# --- Importing OpenAI's GPT-2 weights in the Hugging Face layout ---------------------------------

HF_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

# HF key -> our key. GPT-2 stores these as Conv1D, (in, out): transposed relative to nn.Linear.
_BLOCK_KEYS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.c_attn.weight": "attn.c_attn.weight",
    "attn.c_attn.bias": "attn.c_attn.bias",
    "attn.c_proj.weight": "attn.c_proj.weight",
    "attn.c_proj.bias": "attn.c_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight",
    "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight",
    "mlp.c_proj.bias": "mlp.c_proj.bias",
}
_TRANSPOSED = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
_TOP_KEYS = {k: k for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
# Buffers and the tied LM head that HF files may carry; the classifier has no use for them.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class WeightsError(RuntimeError):
    """Base weights could not be had or do not fit the model."""


def hf_key_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """HF GPT-2 key (without a 'transformer.' prefix) -> (our key, stored transposed)."""
    mapping = {hf: ("transformer." + ours, False) for hf, ours in _TOP_KEYS.items()}
    for i in range(n_layer):
        for hf, ours in _BLOCK_KEYS.items():
            mapping[f"h.{i}.{hf}"] = (f"transformer.h.{i}.{ours}", hf in _TRANSPOSED)
    return mapping


def load_hf_gpt2(model: GPTClassifier, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF GPT-2 tensors into every transformer parameter of `model`; the head stays as it is."""
    mapping = hf_key_map(model.config.n_layer)
    source = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("transformer.")
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key not in mapping:
            raise WeightsError(f"unexpected tensor {key!r} in GPT-2 weights")
        source[key] = tensor
    missing = sorted(set(mapping) - set(source))
    if missing:
        raise WeightsError(f"GPT-2 weights lack {len(missing)} tensors, first {missing[0]!r}")
    params = model.state_dict()
    with torch.no_grad():
        for hf_key, (ours, transposed) in mapping.items():
            tensor = source[hf_key].t() if transposed else source[hf_key]
            if tensor.shape != params[ours].shape:
                raise WeightsError(
                    f"shape mismatch for {hf_key!r}: weights have {tuple(source[hf_key].shape)}, "
                    f"model {ours!r} needs {tuple(params[ours].shape)}"
                    + (" (after transposing Conv1D)" if transposed else "")
                )
            params[ours].copy_(tensor)


def resolve_hf_weights(source: str | Path | None, preset: str) -> Path:
    """A local model.safetensors (file or directory), or the preset's file from the Hugging Face Hub."""
    if source is not None:
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise WeightsError(f"no GPT-2 weights at {path}")
        return path
    if preset not in HF_REPOS:
        raise WeightsError(f"preset {preset!r} has no pretrained weights; choose one of {sorted(HF_REPOS)}")
    from huggingface_hub import hf_hub_download  # honours HF_HUB_OFFLINE and HF_HOME; shows progress

    try:
        return Path(hf_hub_download(HF_REPOS[preset], "model.safetensors"))
    except Exception as exc:  # network, offline mode, auth, disk: all end the same way for the user
        raise WeightsError(
            f"could not download {HF_REPOS[preset]}/model.safetensors from the Hugging Face Hub: {exc}"
        ) from exc


def pretrained_classifier(config: GPTConfig, preset: str, source: str | Path | None = None) -> GPTClassifier:
    """A classifier whose transformer holds OpenAI's GPT-2 weights and whose head is freshly initialised."""
    from safetensors.torch import load_file

    path = resolve_hf_weights(source, preset)
    model = GPTClassifier(config)
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    load_hf_gpt2(model, tensors)
    return model
