"""GPT-2 as a sequence classifier, in one readable file (nanoGPT's layout and parameter names).

The classifier reads the hidden state at each row's last real token. Batches come right-padded; the model
packs their real tokens into one stream, so no layer but attention ever computes on padding, and attention is
causal, so a row's real tokens never see its padding: no attention mask is needed, and a row's logits cannot
depend on what it was batched with.
"""

import math
from dataclasses import asdict, dataclass, fields

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


# What one attention call costs beyond its padded tokens, in tokens: splitting a batch's rows into groups of
# similar length pays off once it saves more padding than this. Small: attention is a few percent of the model.
ATTENTION_OVERHEAD_TOKENS = 16


def padding_groups(lengths: list[int], overhead_tokens: int = ATTENTION_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices split into groups of consecutive lengths (shortest first) that minimise the padded tokens
    plus overhead_tokens per group. Dynamic programming, O(rows^2)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, start_of = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)  # best[end]: cost of order[:end]
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):  # ties keep the earliest start: the longer last group
            cost = best[start] + overhead_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[start_of[end] : end])
        end = start_of[end]
    return groups[::-1]


class Packing:
    """Where a right-padded batch's real tokens lie once packed into one (N, C) stream, the padding dropped.

    Every layer but attention works token by token, so it runs on the N real tokens alone, whatever the
    rows' lengths. Attention runs per group of rows, padded to the group's longest row: causal attention
    means a real token never sees the padding after it. On CPU the groups are rows of similar length
    (padding_groups); on CUDA, where an attention call costs more than the padding it would save, one group.
    Built on the CPU and copied to the device once, so the forward pass never waits for the device.
    """

    def __init__(self, lengths: torch.Tensor, device: torch.device | str):
        rows = lengths.tolist()
        if min(rows) < 1:
            raise ValueError(f"every row needs at least one token, got lengths {rows}")
        device = torch.device(device)
        lengths = torch.tensor(rows)
        starts = lengths.cumsum(0) - lengths  # each row's first token in the stream
        real = torch.arange(max(rows)) < lengths[:, None]  # (B, T)
        self.tokens = real.view(-1).nonzero().squeeze(1).to(device)  # (N,) each token's place in the (B*T) batch
        self.positions = real.nonzero()[:, 1].to(device)  # (N,) each token's position in its row
        self.last = (starts + lengths - 1).to(device)  # (B,) each row's last token in the stream
        groups = padding_groups(rows) if device.type == "cpu" else [list(range(len(rows)))]
        # The groups padded and laid one after another: pad_index gives the stream index each padded place reads, row
        # by row, and unpad each stream token's place in that layout. A row's padding reads the row's own last token:
        # causal attention gives padding zero weight, but 0 x NaN is NaN, so padding that read another row's token
        # would carry that row's overflow into this one. The row's own last token is read by the row anyway.
        self.groups = [(len(group), max(rows[i] for i in group)) for group in groups]  # (b, T_g) per group
        pad_index, unpad, offset = [], torch.empty(len(self.positions), dtype=torch.long), 0
        for group, (b, T) in zip(groups, self.groups, strict=True):
            index = torch.empty(b, T, dtype=torch.long)
            for j, i in enumerate(group):
                index[j, : rows[i]] = torch.arange(starts[i], starts[i] + rows[i])
                index[j, rows[i] :] = starts[i] + rows[i] - 1
                unpad[starts[i] : starts[i] + rows[i]] = torch.arange(offset + j * T, offset + j * T + rows[i])
            pad_index.append(index.view(-1))
            offset += b * T
        self.pad_index = torch.cat(pad_index).to(device)  # (sum of b * T_g,)
        self.unpad = unpad.to(device)  # (N,)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v fused, as GPT-2 stores them
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, packing: Packing | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) packed tokens -> (N, C); given keep, only the output of those tokens: (len(keep), C).
        Without a packing, x is a whole (B, T, C) right-padded batch -> (B, T, C) (GPTClassifier.forward_padded)."""
        qkv = self.c_attn(x)  # (N, 3C)
        if packing is None:
            return self.c_proj(self.attend(qkv))
        # index_select, not qkv[index]: a row-wise copy, some 2x faster on CPU than advanced indexing's gather
        padded = qkv.index_select(0, packing.pad_index).split([b * T for b, T in packing.groups])
        outputs = [
            self.attend(g.view(b, T, -1)).view(b * T, -1) for g, (b, T) in zip(padded, packing.groups, strict=True)
        ]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (sum of b * T_g, C)
        return self.c_proj(y.index_select(0, packing.unpad if keep is None else packing.unpad[keep]))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(b, T, 3C) fused q, k, v of right-padded rows -> (b, T, C) causal attention output."""
        b, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3
        q, k, v = qkv.view(b, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # each (b, nh, T, hs)
        if qkv.requires_grad and qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu":
            # torch's CPU attention backward runs 1.7x (rows of 120 tokens) to 7x (9 tokens) slower in bfloat16
            # than in float32 (torch 2.13, 2 threads; docs/performance.md, "Training speed"): with gradients to
            # take, bfloat16 q, k, v are attended in float32, out of the autocast that would cast them back; the
            # forward pass alone is as fast in either.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(qkv.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, nh, T, hs)
        return y.transpose(1, 2).reshape(b, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's; inference fuses it into c_fc (precision.pack_linears)
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

    def forward(self, x: torch.Tensor, packing: Packing | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) packed tokens -> (N, C); given keep, only those tokens' outputs: (len(keep), C). Without a
        packing, a whole (B, T, C) right-padded batch -> (B, T, C)."""
        residual = x if keep is None else x[keep]
        x = residual + self.attn(self.ln_1(x), packing, keep)
        return x + self.mlp(self.ln_2(x))


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

    def prefix(self, idx: torch.Tensor, packing: Packing, n_blocks: int) -> torch.Tensor:
        """(B, T) right-padded token ids laid out by `packing` -> (N, C) residual stream of the N real tokens,
        row after row, after the embeddings and the first n_blocks."""
        T = idx.size(1)
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx.view(-1)[packing.tokens]) + self.transformer.wpe(packing.positions)  # (N, C)
        for block in self.transformer.h[:n_blocks]:
            x = block(x, packing)
        return x

    def suffix(self, x: torch.Tensor, packing: Packing, n_blocks: int) -> torch.Tensor:
        """(N, C) packed residual stream after the first n_blocks -> (B, n_labels) logits at each row's last token;
        NaN throughout for a row whose final hidden state is not finite.

        Only the last token is read, so the final block computes only there (its attention still reads every
        token): the same logits for about a twelfth less work in GPT-2 124M.
        """
        blocks = self.transformer.h[n_blocks:]
        for block in blocks[:-1]:
            x = block(x, packing)
        x = blocks[-1](x, packing, keep=packing.last) if len(blocks) else x[packing.last]  # (B, C)
        x = self.transformer.ln_f(x)
        # A row whose final hidden state overflowed gets NaN logits: an int8-quantized head would turn NaN or inf
        # into finite numbers, a made-up answer nobody could tell from a real one.
        return self.score(x).masked_fill(~torch.isfinite(x).all(dim=1, keepdim=True), float("nan"))

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded token ids and (B,) real lengths -> (B, n_labels) logits."""
        packing = Packing(lengths, idx.device)
        return self.suffix(self.prefix(idx, packing, 0), packing, 0)

    def forward_padded(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """forward's logits computed on the whole padded batch: (B, T) right-padded token ids and (B,) real
        lengths -> (B, n_labels). More work than forward (the padding is computed, then never read: attention is
        causal), but no shape depends on the data, so torch.export traces it with dynamic batch and sequence
        axes (the ONNX export, training.export.formats)."""
        T = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, None)
        last = x[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        return self.score(self.transformer.ln_f(last))


# --- Importing OpenAI's GPT-2 weights in the Hugging Face layout ---------------------------------

# GPT-2 stores these as Conv1D, (in, out): transposed relative to nn.Linear (nanoGPT's `transposed`).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers and the tied LM head that HF files may carry; the classifier has no use for them.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class WeightsError(RuntimeError):
    """Base weights could not be had or do not fit the model."""


def hf_key_map(model: GPTClassifier) -> dict[str, tuple[str, bool]]:
    """HF GPT-2 key (without a 'transformer.' prefix) -> (our key, stored transposed), for every tensor of
    `model`'s transformer. Our names are GPT-2's own, so the map is a rule (nanoGPT's from_pretrained): the same
    name under 'transformer.', and the Conv1D weights (names ending in one of TRANSPOSED) transposed."""
    return {key: (f"transformer.{key}", key.endswith(TRANSPOSED)) for key in model.transformer.state_dict()}


def load_hf_gpt2(model: GPTClassifier, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF GPT-2 tensors into every transformer parameter of `model`; the head stays as it is.

    tensors: HF GPT-2 keys (with or without 'transformer.') to tensors in its layout. Raises WeightsError naming an
    unexpected or missing key, or a key whose shape does not fit with both shapes.
    """
    mapping = hf_key_map(model)
    source = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("transformer.")
        if key.endswith(IGNORED_SUFFIXES):
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
