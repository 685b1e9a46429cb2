import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from training.finetune.base import pretrained_classifier
from training.runtime.inference import pad_right, probabilities
from training.runtime.model import (
    GPTClassifier,
    GPTConfig,
    Packing,
    WeightsError,
    load_hf_gpt2,
    padding_groups,
)

ROWS = [[5, 17, 33, 2, 9, 100, 41], [7], [250, 3, 3, 80], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture
def model(tiny_config) -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(tiny_config).eval()


def run(model, rows, pad_id):
    idx, lengths = pad_right(rows, pad_id)
    with torch.no_grad():
        return probabilities(model(idx, lengths))


def test_a_rows_probabilities_do_not_depend_on_padding_or_batch_partners(model, tiny_config):
    alone = torch.cat([run(model, [row], pad_id=0) for row in ROWS])  # B=1: no padding at all
    assert_close(run(model, ROWS, pad_id=0), alone)
    assert_close(run(model, ROWS, pad_id=tiny_config.vocab_size - 1), alone)
    partners = [[1] * 30, ROWS[2], [60, 61]]  # a longer partner means more padding on every row
    assert_close(run(model, [*partners, *ROWS], pad_id=7)[len(partners) :], alone)


def test_pooling_reads_the_last_real_token_not_the_padding(model):
    short, long = [11, 22, 33], [4] * 9
    idx, lengths = pad_right([short, long], pad_id=200)
    with torch.no_grad():
        logits = model(idx, lengths)
        alone = model(*pad_right([short], pad_id=200))
        # what the reference notebook's [:, -1] would read: the short row's last pad token
        every = torch.full_like(lengths, idx.size(1))  # every position counted as real, padding included
        hidden = model.prefix(idx, Packing(every, "cpu"), model.config.n_layer).view(*idx.shape, -1)
        at_pad = model.score(model.transformer.ln_f(hidden[:, -1]))
    assert_close(logits[0], alone[0])
    assert not torch.allclose(logits[0], at_pad[0], atol=1e-4)
    assert_close(logits[1], at_pad[1])  # the unpadded row's last token is the batch's last column


def test_rows_of_very_different_lengths_attend_in_several_groups_and_score_as_alone(model):
    rows = [[3] * 40, [9], [4, 5], [6] * 41, [7] * 60, [8, 8, 8]]
    assert len(Packing(torch.tensor([len(r) for r in rows]), "cpu").groups) > 1
    alone = torch.cat([run(model, [row], pad_id=0) for row in rows])
    assert_close(run(model, rows, pad_id=0), alone)


OVERFLOW = 42  # a token id whose embedding is set to 3e38 in every element: finite, so a checkpoint loads


@pytest.mark.parametrize("position", range(len(ROWS) + 1))
@pytest.mark.parametrize("where", ["first-token", "last-token"])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_a_row_that_overflows_is_nan_and_never_changes_another_row(model, position, where, device):
    """Before the fix, padding read the stream's token 0, so a poisoned first row made every padded row NaN."""
    model.to(device)
    with torch.no_grad():
        model.transformer.wte.weight[OVERFLOW] = 3e38

    def run_on_device(rows):
        with torch.no_grad():
            return probabilities(model(*pad_right(rows, 0, device))).cpu()

    poisoned = [OVERFLOW, 5, 6] if where == "first-token" else [5, 6, OVERFLOW]
    rows = [*ROWS[:position], poisoned, *ROWS[position:]]
    together = run_on_device(rows)
    assert torch.isnan(together[position]).all()  # never a made-up probability
    assert torch.isnan(run_on_device([poisoned])).all()
    others = [i for i in range(len(rows)) if i != position]
    assert_close(together[others], torch.cat([run_on_device([rows[i]]) for i in others]))


def test_a_block_given_keep_computes_only_those_tokens(model):
    idx, lengths = pad_right(ROWS, pad_id=0)
    packing = Packing(lengths, "cpu")
    with torch.no_grad():
        x = model.prefix(idx, packing, 1)  # (N, C)
        assert x.shape == (sum(len(r) for r in ROWS), model.config.n_embd)
        for block in model.transformer.h:
            assert_close(block(x, packing, keep=packing.last), block(x, packing)[packing.last])


def test_bfloat16_attention_with_gradients_runs_in_float32_and_returns_bfloat16(model, tiny_config):
    """Under bfloat16 autocast on CPU, attention that takes gradients computes in float32 (its backward is slow in
    bfloat16 there); its forward alone stays in bfloat16."""
    attn = model.transformer.h[0].attn
    torch.manual_seed(1)
    qkv = torch.randn(2, 6, 3 * tiny_config.n_embd, dtype=torch.bfloat16)
    q, k, v = qkv.view(2, 6, 3, tiny_config.n_head, -1).permute(2, 0, 3, 1, 4)

    def expected(dtype):
        y = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
        return y.to(torch.bfloat16).transpose(1, 2).reshape(2, 6, -1)

    assert not torch.equal(expected(torch.float32), expected(torch.bfloat16))  # the two precisions do differ here
    leaf = qkv.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = attn.attend(leaf)
        without = attn.attend(qkv)
    assert with_grad.dtype == without.dtype == torch.bfloat16
    assert torch.equal(with_grad, expected(torch.float32))
    assert torch.equal(without, expected(torch.bfloat16))
    with_grad.float().sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and leaf.grad.abs().sum() > 0


def test_prefix_then_suffix_equals_forward_at_every_split(model, tiny_config):
    idx, lengths = pad_right(ROWS, pad_id=0)
    with torch.no_grad():
        full = model(idx, lengths)
        for k in range(tiny_config.n_layer + 1):
            packing = Packing(lengths, "cpu")
            assert_close(model.suffix(model.prefix(idx, packing, k), packing, k), full)


def test_forward_padded_computes_the_padding_and_gives_the_same_logits(model):
    rows = [[3] * 40, [9], [4, 5], [6] * 41, [7] * 60, [8, 8, 8]]
    for pad_id in (0, 7):  # the padding is computed, so its values must not matter either
        idx, lengths = pad_right(rows, pad_id)
        with torch.no_grad():
            assert_close(model.forward_padded(idx, lengths), model(idx, lengths))


def test_forward_refuses_sequences_longer_than_the_block(model, tiny_config):
    idx = torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"sequence of {tiny_config.block_size + 1} tokens exceeds block_size"):
        model(idx, torch.tensor([1]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param(dict(n_layer=0), r"GPTConfig\.n_layer must be a positive integer, got 0", id="zero-layers"),
        pytest.param(dict(n_embd=32.0), r"GPTConfig\.n_embd must be a positive integer, got 32\.0", id="float"),
        pytest.param(dict(n_head=True), r"GPTConfig\.n_head must be a positive integer, got True", id="bool"),
        pytest.param(dict(block_size="64"), r"GPTConfig\.block_size must be a positive integer, got '64'", id="str"),
        pytest.param(dict(n_head=3), r"n_embd 32 is not divisible by n_head 3", id="heads"),
        pytest.param(dict(n_labels=1), r"at least 2 labels, got n_labels=1", id="one-label"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig.from_preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt3'; choose one of \['gpt2', "):
        GPTConfig.from_preset("gpt3")


# --- Hugging Face GPT-2 import --------------------------------------------------------------------


def hf_model(tiny_config, cls_name: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=tiny_config.vocab_size,
        n_positions=tiny_config.block_size,
        n_embd=tiny_config.n_embd,
        n_layer=tiny_config.n_layer,
        n_head=tiny_config.n_head,
        activation_function="gelu_new",  # GPT-2's tanh-approximated GELU
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tiny_config.vocab_size - 1,
        eos_token_id=tiny_config.vocab_size - 1,
        tie_word_embeddings=False,  # so that the LM head's own lm_head.weight is in the file
    )
    torch.manual_seed(1)
    model = getattr(transformers, cls_name)(config).eval()
    # GPT-2's init zeroes biases and keeps activations small; random values everywhere make a swapped,
    # untransposed or skipped tensor, or the wrong GELU, show up well above the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln_" in name and name.endswith("weight") else 0.0, 0.2)
    return model


@pytest.mark.parametrize("cls_name", ["GPT2Model", "GPT2LMHeadModel"])
def test_hf_import_matches_transformers_hidden_states(tmp_path, tiny_config, cls_name):
    hf = hf_model(tiny_config, cls_name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    keys = set(load_file(tmp_path / "model.safetensors"))
    if cls_name == "GPT2LMHeadModel":
        assert "lm_head.weight" in keys and "transformer.wte.weight" in keys
    else:
        # openai-community/gpt2 also carries each block's causal-mask buffer, which the import skips
        tensors = load_file(tmp_path / "model.safetensors")
        mask = torch.tril(torch.ones(tiny_config.block_size, tiny_config.block_size)).view(
            1, 1, *[tiny_config.block_size] * 2
        )
        tensors.update({f"h.{i}.attn.bias": mask.clone() for i in range(tiny_config.n_layer)})
        save_file(tensors, tmp_path / "model.safetensors")

    model = pretrained_classifier(tiny_config, "gpt2", source=tmp_path).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([20, 3, 11])  # right-padded rows: ours packs them, transformers runs each alone
    with torch.no_grad():
        ours = model.transformer.ln_f(model.prefix(idx, Packing(lengths, "cpu"), tiny_config.n_layer))  # (N, C)
        body = hf.transformer if cls_name == "GPT2LMHeadModel" else hf
        theirs = torch.cat([body(idx[i : i + 1, :n]).last_hidden_state[0] for i, n in enumerate(lengths.tolist())])
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.fixture
def hf_tensors(tmp_path, tiny_config) -> dict[str, torch.Tensor]:
    hf_model(tiny_config, "GPT2Model").save_pretrained(tmp_path / "hf", safe_serialization=True)
    return load_file(tmp_path / "hf" / "model.safetensors")


def test_hf_import_names_the_key_and_both_shapes_on_a_mismatch(hf_tensors, tiny_config):
    hf_tensors["h.1.mlp.c_fc.weight"] = torch.zeros(tiny_config.n_embd, 3)
    with pytest.raises(
        WeightsError,
        match=r"shape mismatch for 'h\.1\.mlp\.c_fc\.weight': weights have \(32, 3\), "
        r"model 'transformer\.h\.1\.mlp\.c_fc\.weight' needs \(128, 32\) \(after transposing Conv1D\)",
    ):
        load_hf_gpt2(GPTClassifier(tiny_config), hf_tensors)


def test_hf_import_names_a_missing_key(hf_tensors, tiny_config):
    del hf_tensors["h.0.ln_2.bias"]
    with pytest.raises(WeightsError, match=r"GPT-2 weights lack 1 tensors, first 'h\.0\.ln_2\.bias'"):
        load_hf_gpt2(GPTClassifier(tiny_config), hf_tensors)


def test_hf_import_names_an_unexpected_key(hf_tensors, tiny_config):
    # a file with more blocks than the config asks for
    hf_tensors["h.2.ln_1.weight"] = hf_tensors["h.0.ln_1.weight"]
    with pytest.raises(WeightsError, match=r"unexpected tensor 'h\.2\.ln_1\.weight'"):
        load_hf_gpt2(GPTClassifier(tiny_config), hf_tensors)


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        pytest.param([5], [[0]], id="one-row"),
        pytest.param([7, 7, 7], [[0, 1, 2]], id="equal-lengths-stay-together"),
        pytest.param([200, 3, 4], [[1, 2], [0]], id="a-long-row-alone"),
        pytest.param([30, 20], [[1, 0]], id="padding-cheaper-than-a-call"),
    ],
)
def test_padding_groups_split_where_padding_costs_more_than_a_call(lengths, expected):
    assert padding_groups(lengths, overhead_tokens=64) == expected


def test_padding_groups_cover_every_row_once_shortest_first():
    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    groups = padding_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(64))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)
    assert 1 < len(groups) < 64
