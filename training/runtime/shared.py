"""Several classifiers on one base: one copy of a shared frozen prefix in memory and one prefix pass per text.

Classifiers fine-tuned from the same base over the same frozen blocks record the same prefix fingerprint
(training.runtime.prefix), verified against their weights when they load. SharedClassifiers holds such classifiers
by name: members whose fingerprint, device, dtype and quantization agree hold the same prefix modules (the first
member's; the others' copies are dropped when they join, and the modules are freed when the last member that holds
them leaves), and predict_logits runs the prefix once for all of them, then each member's tail (its trainable
blocks, final norm and head). Members that differ each run their own prefix.

Sharing never changes an answer: a member computes exactly the operations its own Classifier would on the same
rows and batches (GPTClassifier.forward is prefix then suffix; here the split falls at the end of the shared
blocks), with modules that hold the same weights, packed or quantized alike, so its logits are bit for bit its
Classifier's. Adding, replacing and removing members is safe while other threads predict: a call works on the
members as they were when it started.

    group = SharedClassifiers({"spam": Classifier.load("ckpt/spam", options), "lang": Classifier.load(...)})
    rows = group.tokenize(texts, ["spam", "lang"])
    logits = group.predict_logits({name: r for name, (r, _) in rows.items()})   # {name: (N, n_labels)}
"""

import ctypes
import ctypes.util
import functools
import threading
from dataclasses import dataclass

import torch

from training.runtime.classifier import Classifier
from training.runtime.inference import PAD_ID, length_sorted_batches, pad_right
from training.runtime.model import GPTClassifier, Packing


class UnknownModel(LookupError):
    """A name that is not a member; `names` are the members', sorted."""

    def __init__(self, name: str, names: list[str]):
        self.name, self.names = name, names
        super().__init__(f"no model named {name!r}; the models are {names}")


@dataclass(frozen=True)
class Member:
    """A named classifier and what it shares: members with equal `key` hold one prefix of `blocks` blocks."""

    name: str
    classifier: Classifier
    # (fingerprint sha256, device, dtype, quantization); None: shares nothing (no fingerprint)
    key: tuple | None
    blocks: int  # leading blocks of its prefix (0 with no fingerprint: the whole model is its own)

    @property
    def model(self) -> GPTClassifier:
        return self.classifier.checkpoint.model


def member(name: str, classifier: Classifier) -> Member:
    """`classifier` as a member named `name`; its sharing key from its card's prefix fingerprint."""
    prefix = classifier.card.prefix
    if prefix is None:
        return Member(name, classifier, None, 0)
    key = (prefix.sha256, str(classifier.device), str(classifier.dtype), classifier.quantization)
    return Member(name, classifier, key, prefix.blocks)


def share_prefix(source: Classifier, target: Classifier, blocks: int) -> None:
    """Make `target` hold `source`'s embeddings, first `blocks` blocks and tokenizer (objects, not copies), in
    place; its own are dropped. Callers have made sure the two have the same ones (equal prefix fingerprints)."""
    mine, theirs = target.checkpoint.model.transformer, source.checkpoint.model.transformer
    for name in ("wte", "wpe"):
        mine[name] = theirs[name]
    for i in range(blocks):
        mine.h[i] = theirs.h[i]
    target.checkpoint.tokenizer = source.checkpoint.tokenizer  # some 20 MB of merge ranks each (GPT-2's BPE)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None under another C library."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def give_back_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; nothing elsewhere). Tensors
    a model drops go back to the heap, which glibc keeps: measured with the 124M model, the 340 MB prefix a joining
    member dropped stayed resident until trimmed. Call it once a removed classifier is let go."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class SharedClassifiers:
    """Named Classifiers that share their frozen prefixes where their fingerprints allow (see the module).

    Raises UnknownModel (a LookupError) for a name that is not a member, ValueError for adding a name twice.
    """

    def __init__(self, classifiers: dict[str, Classifier] | None = None):
        self._lock = threading.Lock()  # serialises changes; readers take self._members as it is, whole
        self._members: dict[str, Member] = {}
        for name, classifier in (classifiers or {}).items():
            self.add(name, classifier)

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, name: str) -> Classifier:
        return self._get(self._members, name).classifier

    @property
    def names(self) -> list[str]:
        """The members' names, in the order they were added."""
        return list(self._members)

    def sharing(self, name: str) -> list[str]:
        """The members whose prefix `name` holds and computes with, itself included, in the order they were added;
        just [name] for a member that shares nothing."""
        members = self._members
        key = self._get(members, name).key
        return [name] if key is None else [m.name for m in members.values() if m.key == key]

    def add(self, name: str, classifier: Classifier) -> None:
        """Add `classifier` under `name`, holding the prefix of the members it shares one with (its own copy is
        dropped). Raises ValueError when `name` is taken."""
        with self._lock:
            if name in self._members:
                raise ValueError(f"a model named {name!r} is already loaded")
            self._members = {**self._members, name: self._joined(name, classifier)}
        give_back_freed_memory()  # the prefix it dropped

    def replace(self, name: str, classifier: Classifier) -> Classifier:
        """Put `classifier` under `name` in place of the member there, atomically: a predict_logits call that
        started before runs on the old one, later calls on the new one. Returns the old classifier. Raises
        UnknownModel."""
        with self._lock:
            old = self._get(self._members, name)
            self._members = {**self._members, name: self._joined(name, classifier)}
        give_back_freed_memory()
        return old.classifier

    def remove(self, name: str) -> Classifier:
        """Take the member `name` out and return its classifier; a prefix no other member holds is freed once no
        call still runs on it and the caller lets the classifier go (then give_back_freed_memory returns it to the
        operating system). Raises UnknownModel."""
        with self._lock:
            old = self._get(self._members, name)
            self._members = {k: v for k, v in self._members.items() if k != name}
        return old.classifier

    def _joined(self, name: str, classifier: Classifier) -> Member:
        """`classifier` as a member, holding the prefix of a current member with its key, if any."""
        new = member(name, classifier)
        holder = next((m for m in self._members.values() if new.key is not None and m.key == new.key), None)
        if holder is not None:
            share_prefix(holder.classifier, new.classifier, new.blocks)
        return new

    @staticmethod
    def _get(members: dict[str, Member], name: str) -> Member:
        if name not in members:
            raise UnknownModel(name, sorted(members))
        return members[name]

    def tokenize(self, texts: list[str], names: list[str]) -> dict[str, tuple[list[list[int]], list[bool]]]:
        """{name: (token rows, truncated flags)} of `texts` for each named member, as its Classifier.tokenize gives
        them. Members that share a prefix (hence a tokenizer) and a max_tokens get the same rows object, which
        predict_logits then runs through the prefix once. Raises UnknownModel."""
        members = self._members
        out, done = {}, {}
        for name in names:
            m = self._get(members, name)
            seen = None if m.key is None else (m.key, m.classifier.card.max_tokens)
            if seen not in done or seen is None:
                done[seen] = m.classifier.tokenize(texts)
            out[name] = done[seen]
        return out

    @torch.inference_mode()
    def predict_logits(
        self,
        rows: dict[str, list[list[int]]],
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """{name: token rows} -> {name: (len(rows), n_labels) float32 logits on the CPU, in row order}, each equal
        bit for bit to Classifier.predict_logits of the same rows and limits (None: one forward pass, for a batch
        the caller formed).

        Members sharing a prefix and asked about equal rows (tokenize gives them the same list) run the prefix once
        per batch, then each its tail on the prefix's output. Raises UnknownModel.
        """
        members = self._members
        passes: list[tuple[list[list[int]], list[Member]]] = []  # rows and the members that share their prefix
        for name, asked in rows.items():
            m = self._get(members, name)
            same = (p for p in passes if m.key is not None and p[1][0].key == m.key and _equal(p[0], asked))
            found = next(same, None)
            if found is None:
                passes.append((asked, [m]))
            else:
                found[1].append(m)
        out = {}
        for asked, sharing in passes:
            out.update(_run(asked, sharing, max_batch_size, max_batch_tokens))
        return out


def _equal(a: list[list[int]], b: list[list[int]]) -> bool:
    return a is b or a == b


def _run(
    rows: list[list[int]], members: list[Member], max_batch_size: int | None, max_batch_tokens: int | None
) -> dict[str, torch.Tensor]:
    """The logits of `members` (one prefix) on `rows`: inference.predict_logits' batches and padding, the prefix
    run once per batch and each member's tail on its output."""
    prefix, blocks = members[0].model, members[0].blocks
    device = prefix.transformer.wte.weight.device
    out = {m.name: torch.empty(len(rows), m.model.config.n_labels) for m in members}
    for batch in length_sorted_batches([len(r) for r in rows], max_batch_size, max_batch_tokens):
        idx, lengths = pad_right([rows[i] for i in batch], PAD_ID, device)
        packing = Packing(lengths, idx.device)
        x = prefix.prefix(idx, packing, blocks)
        for m in members:
            out[m.name][batch] = m.model.suffix(x, packing, blocks).float().cpu()
    return out
