"""The demo's tokenizer: trained by the HuggingFace ``tokenizers`` library on any text.

:func:`train_tokenizer` learns a vocabulary from a corpus, word-level (``kind="word"``, the
default: every distinct word and punctuation mark of the corpus, the most frequent first when
``vocab_size`` cuts it) or BPE (``kind="bpe"``: sub-words, so unseen words are spelled from
pieces). Both split on whitespace and around every punctuation mark (``"sky?!"`` → ``sky``,
``?``, ``!``), keep case, map anything outside the vocabulary to ``<unk>`` (never an error),
and truncate to ``max_length`` tokens. The special tokens have fixed ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>``
2, ``<sep>`` 3, ``<eos>`` 4, whatever the corpus.

The tokenizer serialises to the ``tokenizers`` JSON format (:meth:`DemoTokenizer.to_str`), a
plain data file: loading it runs no code. :meth:`DemoTokenizer.digest` hashes it, which is how
the pretrained-model cache tells vocabularies apart.

Examples:
    >>> tok = train_tokenizer(["what color is the sky?", "the sky is blue."])
    >>> tok.tokens("what color is the grass?")
    ['what', 'color', 'is', 'the', '<unk>', '?']
    >>> tok.encode("the sky") == [tok.token_to_id("the"), tok.token_to_id("sky")]
    True
    >>> tok.pad_id, tok.unk_id, tok.bos_id, tok.sep_id, tok.eos_id
    (0, 1, 2, 3, 4)
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

PAD, UNK, BOS, SEP, EOS = "<pad>", "<unk>", "<bos>", "<sep>", "<eos>"
SPECIALS = (PAD, UNK, BOS, SEP, EOS)
KINDS = ("word", "bpe")
_BPE_SUFFIX = "</w>"


class DemoTokenizer:
    """A trained ``tokenizers.Tokenizer`` with the demo's special tokens and a length limit.

    Build it with :func:`train_tokenizer` or :meth:`from_str`. ``len(tok)`` is the vocabulary
    size (the language model's ``vocab_size``).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose first five ids are :data:`SPECIALS`.
        max_length: the longest encoding :meth:`encode` returns (``None``: no limit).
    """

    def __init__(self, tokenizer, max_length: int | None = None):
        wrong = [(s, i) for i, s in enumerate(SPECIALS) if tokenizer.token_to_id(s) != i]
        if wrong:
            raise ValueError(
                f"The tokenizer must have the special tokens {SPECIALS} at ids 0-4; "
                f"{[s for s, _ in wrong]} are elsewhere or missing. Build it with "
                "influence.demo.tokenizer.train_tokenizer."
            )
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None; got {max_length!r}.")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __repr__(self) -> str:
        return f"DemoTokenizer({len(self)} tokens, max_length={self.max_length})"

    pad_id = property(lambda self: 0, doc="id of ``<pad>`` (always 0)")
    unk_id = property(lambda self: 1, doc="id of ``<unk>``")
    bos_id = property(lambda self: 2, doc="id of ``<bos>``")
    sep_id = property(lambda self: 3, doc="id of ``<sep>``")
    eos_id = property(lambda self: 4, doc="id of ``<eos>``")

    @property
    def vocab(self) -> list[str]:
        """Every token, indexed by id."""
        return [self.tokenizer.id_to_token(i) for i in range(len(self))]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` (``<unk>`` for the unknown ones), truncated to ``max_length``."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens[: self.max_length]

    def encode(self, text: str, truncate: bool = True) -> list[int]:
        """Token ids of ``text``, truncated to ``max_length`` unless ``truncate=False``.
        Special tokens written in the text (``"<bos> hi <sep>"``) are recognised as such."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids[: self.max_length] if truncate else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """The ``tokenizers`` JSON of the vocabulary and pipeline (data only)."""
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, json: str, max_length: int | None = None) -> "DemoTokenizer":
        """Loads :meth:`to_str`'s JSON (parsed as data by ``tokenizers``; no code runs)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(json), max_length)

    def digest(self) -> str:
        """A short hash of the vocabulary, the pipeline and ``max_length``."""
        blob = f"{self.to_str()}|{self.max_length}".encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int | None = None,
    kind: str = "word",
    max_length: int | None = None,
) -> DemoTokenizer:
    """Trains a word-level or BPE tokenizer on ``corpus`` with the ``tokenizers`` library.

    Args:
        corpus: texts (e.g. the training prompts and responses).
        vocab_size: the largest vocabulary, specials included; ``None`` keeps every word of the
            corpus (``"word"``) or 30,000 (``"bpe"``). A word-level vocabulary keeps the most
            frequent words, ties broken alphabetically.
        kind: ``"word"`` or ``"bpe"``.
        max_length: truncation length of :meth:`DemoTokenizer.encode` (``None``: none).

    Returns:
        :class:`DemoTokenizer`; deterministic for a given corpus and arguments.

    Raises:
        ValueError: on an unknown ``kind``, or a ``vocab_size`` that cannot hold the specials.

    Examples:
        >>> tok = train_tokenizer(["low lower lowest", "new newer newest"], vocab_size=40, kind="bpe")
        >>> tok.decode(tok.encode("newest lower"))
        'newest lower'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind not in KINDS:
        raise ValueError(f"Invalid tokenizer kind {kind!r}. Supported: {KINDS}.")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size <= len(SPECIALS)):
        raise ValueError(
            f"vocab_size must be an integer > {len(SPECIALS)} (the special tokens {SPECIALS}) "
            f"or None for the whole corpus; got {vocab_size!r}."
        )
    if kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size or 2**31 - 1, min_frequency=1, special_tokens=list(SPECIALS),
            show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=_BPE_SUFFIX))
        tokenizer.decoder = decoders.BPEDecoder(suffix=_BPE_SUFFIX)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size or 30_000, special_tokens=list(SPECIALS),
            end_of_word_suffix=_BPE_SUFFIX, show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # words, and each punctuation mark alone
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer.train_from_iterator(list(corpus), trainer)
    return DemoTokenizer(tokenizer, max_length)
