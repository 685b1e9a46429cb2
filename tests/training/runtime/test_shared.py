"""Several classifiers on one base: the prefix fingerprint, one prefix in memory and one prefix pass for the members
that share it, and answers bit for bit those of each member's own Classifier."""

import gc
import weakref

import pytest
import torch

from tests.helpers import sibling
from training.runtime.checkpoint import CheckpointError, load_checkpoint
from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.runtime.shared import SharedClassifiers, UnknownModel

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts",
    "ok",
    "see you at the station at 5? " * 9,
    "é😀 <|endoftext|>",
    "WINNER!! Claim your prize now",
]


@pytest.fixture
def siblings(tmp_path, tiny_config, bpe_dir):
    """a and b share their embeddings and first block (b with three labels); c has another prefix."""
    return {
        "a": sibling(tmp_path / "a", tiny_config, bpe_dir, base_seed=0, tail_seed=1),
        "b": sibling(tmp_path / "b", tiny_config, bpe_dir, base_seed=0, tail_seed=2, labels=("x", "y", "z")),
        "c": sibling(tmp_path / "c", tiny_config, bpe_dir, base_seed=5, tail_seed=3),
    }


def load(path, **options) -> Classifier:
    return Classifier.load(path, ClassifierOptions(**{"device": "cpu", **options}))


def test_siblings_record_one_fingerprint_and_another_base_another(siblings):
    a, b, c = (load_checkpoint(siblings[name]).card.prefix for name in "abc")
    assert a == b and a.blocks == 1
    assert c.sha256 != a.sha256 and c.architecture == a.architecture and c.tokenizer == a.tokenizer


def test_a_card_without_a_prefix_reads_as_none(tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint).card.prefix is None


def test_a_config_json_without_the_prefix_field_still_loads(siblings):
    config = siblings["a"] / "config.json"
    config.write_text(config.read_text().replace('"prefix"', '"unread_prefix"'))
    assert load_checkpoint(siblings["a"]).card.prefix is None


@pytest.mark.parametrize(
    ("tensor", "refused"),
    [
        pytest.param("transformer.wte.weight", True, id="embedding"),
        pytest.param("transformer.h.0.mlp.c_fc.weight", True, id="frozen-block"),
        pytest.param("transformer.h.1.mlp.c_fc.weight", False, id="trained-block"),
        pytest.param("score.weight", False, id="head"),
    ],
)
def test_a_changed_prefix_weight_is_refused_naming_the_weights(siblings, tensor, refused):
    from safetensors.torch import load_file, save_file

    weights = siblings["a"] / "model.safetensors"
    state = load_file(weights)
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[0] += 1e-6
    save_file(state, weights)
    if not refused:
        load_checkpoint(siblings["a"])
        return
    with pytest.raises(CheckpointError, match=r"config.json: the recorded prefix fingerprint .* frozen weights"):
        load_checkpoint(siblings["a"])


def test_an_edited_fingerprint_is_refused_naming_what(siblings):
    import json

    config = siblings["a"] / "config.json"
    raw = json.loads(config.read_text())
    raw["prefix"]["tokenizer"] = "0" * 64
    config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="the tokenizer files hash to"):
        load_checkpoint(siblings["a"])
    raw["prefix"]["blocks"] = 7
    config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"'prefix' blocks must be an integer in 0..2, got 7"):
        load_checkpoint(siblings["a"])


OPTIONS = [
    pytest.param({}, id="float32"),
    pytest.param({"quantize_int8": True}, id="int8"),
    pytest.param({"dtype": "bfloat16"}, id="bfloat16"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_each_member_answers_bit_for_bit_as_its_own_classifier(siblings, options):
    try:
        alone = {name: load(path, **options) for name, path in siblings.items()}
    except ValueError as exc:  # bfloat16 on a CPU without it natively
        pytest.skip(str(exc))
    group = SharedClassifiers({name: load(path, **options) for name, path in siblings.items()})
    rows = group.tokenize(TEXTS, ["a", "b", "c"])
    for limits in [(None, None), (2, None), (None, 40)]:
        logits = group.predict_logits({name: r for name, (r, _) in rows.items()}, *limits)
        for name, classifier in alone.items():
            assert torch.equal(logits[name], classifier.predict_logits(rows[name][0], *limits)), (name, limits)
    assert logits["b"].shape == (len(TEXTS), 3)


def test_members_with_one_fingerprint_hold_one_prefix_and_run_it_once(siblings):
    group = SharedClassifiers({name: load(path) for name, path in siblings.items()})
    a, b, c = (group[name].checkpoint.model.transformer for name in "abc")
    assert a.wte is b.wte and a.wpe is b.wpe and a.h[0] is b.h[0]
    assert a.h[1] is not b.h[1] and a.ln_f is not b.ln_f and a.wte is not c.wte and a.h[0] is not c.h[0]
    assert group["a"].checkpoint.tokenizer is group["b"].checkpoint.tokenizer
    assert group.sharing("a") == ["a", "b"] and group.sharing("c") == ["c"]
    calls = []
    for name, module in (("ab", a.wte), ("c", c.wte), ("tail-a", a.h[1]), ("tail-b", b.h[1])):
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    rows = group.tokenize(TEXTS, ["a", "b", "c"])
    assert rows["a"] is rows["b"] and rows["c"] is not rows["a"]
    group.predict_logits({name: r for name, (r, _) in rows.items()})
    assert sorted(calls) == ["ab", "c", "tail-a", "tail-b"]


def test_members_asked_about_other_rows_run_the_prefix_for_each(siblings):
    group = SharedClassifiers({name: load(siblings[name]) for name in "ab"})
    calls = []
    group["a"].checkpoint.model.transformer.wte.register_forward_hook(lambda *_: calls.append(1))
    rows = group.tokenize(TEXTS, ["a"])["a"][0]
    logits = group.predict_logits({"a": rows, "b": rows[:2]})
    assert len(calls) == 2 and logits["b"].shape == (2, 3)


def test_the_last_member_holding_a_prefix_frees_it_on_leaving(siblings):
    group = SharedClassifiers({name: load(siblings[name]) for name in "ab"})
    block = weakref.ref(group["a"].checkpoint.model.transformer.h[0])
    rows = group.tokenize(TEXTS, ["b"])["b"][0]
    before = group["b"].predict_logits(rows)
    group.remove("a")  # the first member leaves; b still holds the prefix it shared
    gc.collect()
    assert block() is not None and group.names == ["b"] and group.sharing("b") == ["b"]
    assert torch.equal(group.predict_logits({"b": rows})["b"], before)
    group.remove("b")
    gc.collect()
    assert block() is None


def test_replace_swaps_one_member_and_keeps_the_shared_prefix(siblings):
    group = SharedClassifiers({name: load(siblings[name]) for name in "ab"})
    shared = group["a"].checkpoint.model.transformer.h[0]
    new = load(siblings["a"])
    old = group.replace("b", new)
    assert old is not new and group["b"] is new and group.sharing("b") == ["a", "b"]
    assert new.checkpoint.model.transformer.h[0] is shared
    group.replace("b", load(siblings["c"]))
    assert group.sharing("b") == ["b"] and group.sharing("a") == ["a"]


def test_unknown_and_duplicate_names_are_refused(siblings):
    group = SharedClassifiers({"a": load(siblings["a"])})
    with pytest.raises(UnknownModel, match=r"no model named 'x'; the models are \['a'\]") as caught:
        group.predict_logits({"x": [[1]]})
    assert caught.value.names == ["a"]
    for call in (group.remove, group.sharing, group.__getitem__):
        with pytest.raises(UnknownModel):
            call("x")
    with pytest.raises(ValueError, match="a model named 'a' is already loaded"):
        group.add("a", load(siblings["b"]))


def test_a_checkpoint_without_a_fingerprint_shares_nothing(siblings, tiny_checkpoint):
    group = SharedClassifiers({"a": load(siblings["a"]), "plain": load(tiny_checkpoint)})
    assert group.sharing("plain") == ["plain"]
    assert group["plain"].checkpoint.model.transformer.wte is not group["a"].checkpoint.model.transformer.wte
    rows = group.tokenize(TEXTS, ["plain"])["plain"][0]
    assert torch.equal(group.predict_logits({"plain": rows})["plain"], load(tiny_checkpoint).predict_logits(rows))
