"""SentencePiece tokenizer with fixed special ids, lossless round trips and deterministic training.

Special ids of tokenizers Trident trains (LLaMA-compatible for the first three)::

    unk = 0, bos = 1, eos = 2, pad = 3

A loaded ``.model`` keeps its own ids; when it has no pad piece ``pad_id`` is -1 (packed pretraining
samples contain no padding; masking eos instead would silently drop real targets).

Training uses the ``identity`` normalisation and keeps whitespace, so ``decode(encode(text)) == text``
for any text (unknown characters go through byte fallback), which source code needs.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from engine.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lines_for_training(texts: Iterable[str]) -> Iterable[str]:
    """SentencePiece trains on "sentences": feed each non-empty line of every document."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def _iter_text_files(files: Sequence[str | os.PathLike]) -> Iterable[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


class Tokenizer:
    """A loaded SentencePiece model; construct with :meth:`load` or :meth:`train`."""

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: tokenizer model not found", hint="pass an existing SentencePiece .model")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as err:
            raise DataError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.sha256 = file_sha256(self.path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(path)

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str] | Sequence[str | os.PathLike],
        *,
        model_prefix: str | os.PathLike,
        vocab_size: int,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        character_coverage: float = 0.9995,
        user_defined_symbols: Sequence[str] = (),
        max_sentences: int = 2_000_000,
        seed: int = 1234,
        num_threads: int = 1,
        files: bool = False,
    ) -> Tokenizer:
        """Train and write ``<model_prefix>.model``; the same input and options give the same bytes.

        ``texts_or_files`` is an iterable of document strings, or (``files=True``) of text-file paths.
        Input order is kept (no sentence shuffling) and the RNG is seeded, so training is deterministic.
        """
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise DataError(f"unknown tokenizer model_type '{model_type}'", hint="use bpe or unigram")
        if vocab_size < 8:
            raise DataError(f"tokenizer vocab_size {vocab_size} is too small", hint="use at least a few hundred")
        texts = _iter_text_files(texts_or_files) if files else texts_or_files
        Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        spm.set_random_generator_seed(seed)
        # Training into memory keeps the output path out of the model's embedded trainer spec, so the
        # bytes (and sha256) depend only on the input and options.
        model_bytes = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(_lines_for_training(texts)),
                model_writer=model_bytes,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                user_defined_symbols=list(user_defined_symbols),
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=False,
                num_threads=num_threads,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise DataError(
                f"tokenizer training failed: {err}", hint="give more text or a smaller --vocab-size"
            ) from None
        path = f"{model_prefix}.model"
        with open(path + ".tmp", "wb") as f:
            f.write(model_bytes.getvalue())
        os.replace(path + ".tmp", path)
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())  # -1 when the model defines no pad piece

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
