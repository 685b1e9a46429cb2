import contextlib
from dataclasses import replace

import pytest
import torch

import training.finetune.loop
from tests.helpers import pretend_cpu, synthetic
from training.finetune.distributed import SINGLE
from training.finetune.loop import (
    Examples,
    Loop,
    TrainConfig,
    evaluate_loss,
    prefix_cache,
    prepare_trainable,
    tail_forward,
    train,
)
from training.finetune.lora import merge_lora
from training.runtime.inference import pad_right, probabilities
from training.runtime.model import GPTClassifier, GPTConfig

CONFIG = GPTConfig.from_preset("tiny", vocab_size=100)
CPU = torch.device("cpu")


def fresh_model() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(CONFIG)


def validation_loss(model: GPTClassifier, data: Examples) -> float:
    return evaluate_loss(model, tail_forward(model, data.rows, 0, False, CPU, "val"), data, CPU)[0]


def test_loss_goes_down():
    model, data = fresh_model(), synthetic(40, seed=1)
    history = train(model, data, synthetic(10, seed=2), TrainConfig(trainable="all", epochs=4, lr=1e-3, device="cpu"))
    losses = [e.train_loss for e in history.epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    assert history.epochs[-1].val_accuracy == 1.0


def test_class_weights_weigh_each_rows_loss():
    model, data = fresh_model(), synthetic(12, seed=3)
    weights = torch.tensor([0.25, 3.0])
    run = tail_forward(model, data.rows, 0, False, CPU, "val")
    loss, _ = evaluate_loss(model, run, data, CPU, class_weights=weights)
    logits, targets = run(list(range(len(data.rows)))), torch.tensor(data.targets)
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert loss == pytest.approx((each * weights[targets]).mean().item(), rel=1e-5)
    assert loss != pytest.approx(each.mean().item(), rel=1e-3)  # the weights changed it


def test_training_with_class_weights_learns():
    model, data = fresh_model(), synthetic(40, seed=1)
    config = TrainConfig(trainable="all", epochs=4, lr=1e-3, device="cpu")
    history = train(model, data, synthetic(10, seed=2), config, class_weights=torch.tensor([0.5, 2.0]))
    assert history.epochs[-1].train_loss < 0.5 * history.epochs[0].train_loss


@pytest.mark.parametrize("blocks", [pytest.param(1, id="one-block"), pytest.param(2, id="all-blocks")])
def test_cached_prefix_matches_whole_model(blocks):
    data, val = synthetic(24, seed=3), synthetic(8, seed=4)
    results = []
    for cache in (True, False):
        model = fresh_model()
        config = TrainConfig(trainable_blocks=blocks, epochs=2, batch_size=4, lr=1e-3, device="cpu", cache_prefix=cache)
        history = train(model, data, val, config)
        results.append((history.step_losses, [e.val_loss for e in history.epochs], model.state_dict()))
    (cached_steps, cached_val, cached_state), (plain_steps, plain_val, plain_state) = results
    assert len(cached_steps) == 12
    torch.testing.assert_close(cached_steps, plain_steps)
    torch.testing.assert_close(cached_val, plain_val)
    # Adam turns float rounding in near-zero gradients (the cached prefix ran in other batches) into parameter
    # differences near 1e-5: seen on a 16-core machine, where the matrix products split differently
    torch.testing.assert_close(cached_state, plain_state, atol=1e-4, rtol=1e-3)


def test_the_bfloat16_prefix_cast_once_gives_autocasts_numbers_bit_for_bit_and_puts_the_weights_back(monkeypatch):
    model, data = fresh_model(), synthetic(40, seed=5)
    prepare_trainable(model, TrainConfig(trainable_blocks=1, device="cpu"))
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}

    cache = prefix_cache(model, data.rows, 1, CPU, "prefix", progress=False, compute="bfloat16")

    # autocast alone, casting the float32 weights at every call
    monkeypatch.setattr(training.finetune.loop, "frozen_linears_cast", lambda module, dtype: contextlib.nullcontext())
    expected = prefix_cache(model, data.rows, 1, CPU, "prefix", progress=False, compute="bfloat16")
    float32 = prefix_cache(model, data.rows, 1, CPU, "prefix", progress=False)
    assert all(torch.equal(c, e) for c, e in zip(cache, expected, strict=True))
    assert not all(torch.equal(c, f) for c, f in zip(cache, float32, strict=True))  # bfloat16 did compute
    assert all(p is model.get_parameter(name) and torch.equal(p, value) for name, (p, value) in before.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("trainable", ["all", "last-blocks", "lora"])
def test_weight_decay_only_on_matrices_and_embeddings(trainable):
    model = fresh_model()
    config = TrainConfig(trainable=trainable, weight_decay=0.3)
    prepare_trainable(model, config)
    loop = Loop.start(model, config, CPU, SINGLE, None)
    decayed = {id(p) for g in loop.optimizer.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    kept = {id(p) for g in loop.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {id(p): name for name, p in loop.trainable.items()}
    assert decayed | kept == set(names) and not decayed & kept
    assert all(names[i].endswith(("weight", "lora_A", "lora_B")) and "ln_" not in names[i] for i in decayed)
    assert all(names[i].endswith("bias") or ".ln_" in names[i] for i in kept)
    assert "score.weight" in {names[i] for i in decayed} and "transformer.ln_f.weight" in {names[i] for i in kept}
    if trainable == "all":
        assert "transformer.wte.weight" in {names[i] for i in decayed}


def test_a_norm_gain_without_gradient_is_not_decayed():
    """Weight decay moves a weight matrix even without a gradient, never a LayerNorm gain or a bias."""
    model = fresh_model()
    config = TrainConfig(trainable="all", weight_decay=0.5, lr=0.1)
    prepare_trainable(model, config)
    loop = Loop.start(model, config, CPU, SINGLE, None)
    before = {name: p.detach().clone() for name, p in loop.trainable.items()}
    for p in loop.trainable.values():
        p.grad = torch.zeros_like(p)
    loop.optimizer.step()
    assert torch.equal(loop.trainable["transformer.ln_f.weight"], before["transformer.ln_f.weight"])
    assert torch.equal(loop.trainable["score.bias"], before["score.bias"])
    assert not torch.equal(loop.trainable["score.weight"], before["score.weight"])


def test_adamw_is_fused_on_cpu_and_steps_as_the_per_tensor_loop_does():
    """torch's fused AdamW on CPU: the same update as its default per-tensor loop, to float32 rounding."""
    model = fresh_model()
    config = TrainConfig(trainable="all", weight_decay=0.1, lr=0.01)
    prepare_trainable(model, config)
    loop = Loop.start(model, config, CPU, SINGLE, None)
    assert all(g["fused"] for g in loop.optimizer.param_groups)
    start = {name: p.detach().clone() for name, p in loop.trainable.items()}
    reference = {name: p.clone().requires_grad_() for name, p in start.items()}
    names = {id(p): name for name, p in loop.trainable.items()}
    groups = [
        {**g, "params": [reference[names[id(p)]] for p in g["params"]], "fused": None}
        for g in loop.optimizer.param_groups
    ]
    unfused = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for name, p in loop.trainable.items():
            p.grad = torch.randn(p.shape, generator=generator)
            reference[name].grad = p.grad.clone()
        loop.optimizer.step()
        unfused.step()
    for name, p in loop.trainable.items():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(loop.trainable["score.weight"], start["score.weight"])


def test_last_blocks_freezes_the_rest():
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, synthetic(16, seed=5), synthetic(4, seed=6), TrainConfig(epochs=1, lr=1e-3, device="cpu"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("transformer.h.1.", "transformer.ln_f.", "score.")) for k in changed), changed


def test_lora_trains_only_adapters_norm_and_head():
    model = fresh_model()
    prepare_trainable(model, TrainConfig(trainable="lora", lora_rank=4))
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names >= {"transformer.ln_f.weight", "score.weight", "transformer.h.0.attn.c_attn.lora_A"}
    assert all("lora_" in n or n.startswith(("transformer.ln_f.", "score.")) for n in names), names
    # every linear layer of every block carries an adapter: 4 per block, A and B each
    assert sum("lora_" in n for n in names) == CONFIG.n_layer * 4 * 2


def test_lora_merge_keeps_probabilities_and_plain_keys():
    model = fresh_model()
    batch = pad_right(synthetic(6, seed=7).rows, 0)
    with torch.no_grad():
        base = probabilities(model(*batch))
    prepare_trainable(model, TrainConfig(trainable="lora", lora_rank=4))
    with torch.no_grad():  # B starts at zero; make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        unmerged = probabilities(model(*batch))
        merge_lora(model)
        merged = probabilities(model(*batch))
    assert not torch.allclose(unmerged, base, atol=1e-3)
    torch.testing.assert_close(merged, unmerged)
    assert set(model.state_dict()) == set(fresh_model().state_dict())


def test_lora_training_exports_plain_classifier():
    model = fresh_model()
    history = train(model, synthetic(16, seed=8), synthetic(4, seed=9), TrainConfig(trainable="lora", epochs=1))
    assert history.best_epoch == 1
    assert set(model.state_dict()) == set(fresh_model().state_dict())


def test_best_epoch_by_validation_loss_is_kept():
    # Validation labels are the opposite of training's, so validation loss rises as training goes on.
    model, val = fresh_model(), synthetic(10, seed=11, flip=True)
    history = train(model, synthetic(40, seed=10), val, TrainConfig(trainable="all", epochs=4, lr=1e-3, device="cpu"))
    val_losses = [e.val_loss for e in history.epochs]
    assert history.best_epoch == 1 and val_losses[-1] > val_losses[0], val_losses
    assert validation_loss(model, val) == pytest.approx(val_losses[0], rel=1e-5)


def test_training_is_reproducible():
    runs = []
    for _ in range(2):
        model = fresh_model()
        train(model, synthetic(16, seed=12), synthetic(4, seed=13), TrainConfig(epochs=2, lr=1e-3, device="cpu"))
        runs.append(model.state_dict())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"trainable": "some"}, "'some'", id="trainable"),
        pytest.param({"epochs": 0}, "epochs must be at least 1, got 0", id="epochs"),
        pytest.param({"lr": -1.0}, "-1.0", id="lr"),
        pytest.param({"device": "gpu7"}, "'gpu7'", id="device"),
        pytest.param({"precision": "float16"}, r"precision must be one of .* got 'float16'", id="precision"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_too_many_trainable_blocks():
    with pytest.raises(ValueError, match="trainable_blocks 3 exceeds the model's 2 blocks"):
        prepare_trainable(fresh_model(), TrainConfig(trainable_blocks=3))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(TrainConfig(trainable="all", epochs=4, lr=1e-3, device="cpu"), id="all"),
        pytest.param(TrainConfig(trainable_blocks=1, epochs=4, lr=3e-3, device="cpu"), id="cached-prefix-and-tail"),
    ],
)
def test_bfloat16_autocast_where_the_cpu_has_it_natively_keeps_validation_accuracy(monkeypatch, config):
    data, val = synthetic(40, seed=1), synthetic(20, seed=2)
    runs = {}
    for flags, option, dtype in ((("avx2",), "auto", torch.float32), (("avx512_bf16",), "bfloat16", torch.bfloat16)):
        pretend_cpu(monkeypatch, *flags)
        model, seen = fresh_model(), {0: set(), 1: set()}
        for i, block in enumerate(model.transformer.h):  # block 0: the frozen prefix where one is cached
            block.mlp.c_fc.register_forward_hook(lambda m, args, out, dtypes=seen[i]: dtypes.add(out.dtype))
        history = train(model, data, val, replace(config, precision=option))
        assert seen == {0: {dtype}, 1: {dtype}}
        losses = [e.train_loss for e in history.epochs]
        assert losses[-1] < 0.7 * losses[0], losses
        runs[dtype] = history.epochs[-1].val_accuracy
    assert abs(runs[torch.bfloat16] - runs[torch.float32]) <= 0.1, runs


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(TrainConfig(trainable="all", epochs=2, lr=1e-3, device="cpu"), id="all"),
        pytest.param(TrainConfig(trainable_blocks=1, epochs=2, lr=3e-3, device="cpu"), id="cached-prefix-and-tail"),
        pytest.param(TrainConfig(trainable="lora", lora_rank=2, epochs=2, lr=0.1, device="cpu"), id="lora"),
    ],
)
def test_auto_precision_trains_the_same_weights_on_every_cpu_kind(monkeypatch, config):
    """The default precision computes in float32 on AVX2, AVX-512 and native-bfloat16 CPUs alike: the same
    weights to the last bit, so the same command trains the same model on every CPU."""
    weights = []
    for flags in (("avx2",), ("avx2", "avx512f"), ("avx2", "avx512f", "avx512_bf16"), ("amx_bf16",)):
        pretend_cpu(monkeypatch, *flags)
        model = fresh_model()
        train(model, synthetic(16, seed=12), synthetic(6, seed=13), config)
        weights.append(model.state_dict())
    for other in weights[1:]:
        torch.testing.assert_close(other, weights[0], rtol=0, atol=0)


def test_bfloat16_where_it_would_be_emulated_is_refused(monkeypatch):
    pretend_cpu(monkeypatch, "avx2")
    config = TrainConfig(epochs=1, device="cpu", precision="bfloat16")
    with pytest.raises(ValueError, match=r"precision 'bfloat16' needs a device that computes it natively"):
        train(fresh_model(), synthetic(8, seed=0), synthetic(4, seed=1), config)
