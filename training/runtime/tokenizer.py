"""GPT-2's byte-pair encoding through tiktoken, loaded from local files (a checkpoint's, or the copy packaged with
spamgpt) so neither training nor serving needs a network."""

import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

BPE_FILES = ("vocab.bpe", "encoder.json")
# The files OpenAI published with GPT-2 (MIT; credits in training/assets/README.md), packaged with spamgpt, and
# their hashes as tiktoken's own "gpt2" encoding checks them.
PACKAGED_BPE_DIR = Path(__file__).parents[1] / "assets" / "gpt2-bpe"
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"
# tiktoken's r50k pattern: GPT-2's original pre-tokenizer regex, in a faster equivalent form.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(RuntimeError):
    """Tokenizer files missing, altered or malformed."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(file: Path) -> str | None:
    """Why `file` cannot be read as a file: "missing" where nothing is there, "not a regular file" where a
    directory, a FIFO or a device is (reading a FIFO would wait for a writer); None for a regular file."""
    if file.is_file():
        return None
    return "not a regular file" if file.exists() else "missing"


def bpe_hashes(directory: Path) -> dict[str, str]:
    """{file name: sha256} of `directory`'s BPE_FILES; TokenizerError naming the first one missing or not a regular
    file (a directory, a FIFO)."""
    for file in (directory / name for name in BPE_FILES):
        if problem := file_problem(file):
            raise TokenizerError(f"{file}: tokenizer file {problem}")
    return {name: sha256_file(directory / name) for name in BPE_FILES}


def load_tokenizer(directory: str | Path, expected_sha256: dict[str, str] | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding from `directory`/vocab.bpe and encoder.json, checked against the given hashes."""
    directory = Path(directory)
    hashes = bpe_hashes(directory)
    for name, expected in (expected_sha256 or {}).items():
        if hashes.get(name) != expected:
            raise TokenizerError(f"{directory / name}: sha256 {hashes.get(name)} does not match expected {expected}")
    try:
        # tiktoken caches what it reads under a key made from the path alone (in $TMPDIR/data-gym-cache): without
        # the hashes, files replaced at a path it read before would be served from the stale copy
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(directory / "vocab.bpe"),
            str(directory / "encoder.json"),
            vocab_bpe_hash=hashes["vocab.bpe"],
            encoder_json_hash=hashes["encoder.json"],
        )
    except Exception as exc:
        raise TokenizerError(f"{directory}: not a GPT-2 BPE vocabulary ({type(exc).__name__}: {exc})") from exc
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)}
    )


def load_gpt2_bpe(directory: str | Path | None = None) -> tuple[Path, tiktoken.Encoding]:
    """The directory of GPT-2's BPE files and their encoding: `directory` as given, or by default the copy
    packaged with spamgpt (PACKAGED_BPE_DIR), whose files must have GPT2_BPE_SHA256: TokenizerError names the
    file and both hashes otherwise."""
    if directory is not None:
        return Path(directory), load_tokenizer(directory)
    return PACKAGED_BPE_DIR, load_tokenizer(PACKAGED_BPE_DIR, GPT2_BPE_SHA256)


def encode_batch(enc: tiktoken.Encoding, texts: list[str], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text, truncated to max_tokens, and whether it was truncated.

    encode_ordinary: "<|endoftext|>" inside a message is plain text, never a special token. An empty
    encoding (only possible for an empty string) becomes the single <|endoftext|> token so every row has
    a last real token to read.
    """
    ids = [enc.encode_ordinary(text) for text in texts]  # tiktoken's batch call starts a thread pool
    truncated = [len(row) > max_tokens for row in ids]
    return [row[:max_tokens] or [enc.eot_token] for row in ids], truncated
