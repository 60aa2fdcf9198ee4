"""Text classification data: ``.jsonl`` with ``text`` and ``label``, and a word-level vocabulary.

Nothing is downloaded, so there is no hub tokenizer: the vocabulary is built from the training
texts (lower-cased words and punctuation, most frequent first, ties broken alphabetically so the
same data always gives the same ids), with ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2 and
``[SEP]`` = 3. A sequence is ``[CLS] words... [SEP]`` padded or cut to ``max_len``; the arrays are
``input_ids`` and ``attention_mask`` (int64), the input names of a BERT-family ONNX export.
A teacher trained elsewhere must be used with the vocabulary it was trained with
(``WordVocab.load``); ``edgeopt distill`` writes the one it used beside the student.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.errors import DataError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD, UNK, CLS, SEP = range(4)
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"Not bad!"`` -> ``["not", "bad", "!"]``."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class TextExamples:
    """Texts with optional integer labels, as read from a .jsonl file."""

    texts: tuple[str, ...]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def load_jsonl(path: str | os.PathLike[str]) -> TextExamples:
    """Read ``{"text": ..., "label": ...}`` lines (``label`` optional, but all or none).

    Raises:
        DataError: missing file, a line that is not JSON or lacks ``text``, non-integer labels.

    Example:
        >>> ex = load_jsonl("reviews.jsonl")  # doctest: +SKIP
        >>> ex.texts[0], int(ex.labels[0])
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    texts: list[str] = []
    labels: list[Any] = []
    with p.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{p}:{number} is not a JSON object; each line must be "
                                '{"text": ..., "label": ...}') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{p}:{number} has no string 'text' field")
            texts.append(row["text"])
            labels.append(row.get("label"))
    if not texts:
        raise DataError(f"{p} has no examples")
    present = [v is not None for v in labels]
    if any(present) and not all(present):
        raise DataError(f"{p}: {present.count(False)} line(s) have no 'label'; label every line or none")
    y = None
    if all(present):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
            raise DataError(f"{p}: 'label' must be a non-negative integer class index on every line")
        y = np.asarray(labels, dtype=np.int64)
    return TextExamples(tuple(texts), y, str(p))


@dataclass(frozen=True)
class WordVocab:
    """Word -> id for a word-level tokenizer built from data (see the module docstring)."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, texts: Sequence[str], *, max_size: int = 8000, min_count: int = 1) -> WordVocab:
        """The ``max_size`` most frequent tokens of ``texts`` (with counts >= ``min_count``) plus specials."""
        if max_size <= len(SPECIALS):
            raise DataError(f"vocabulary size must be > {len(SPECIALS)}, got {max_size}")
        counts = Counter(tok for t in texts for tok in tokenize(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(ranked[: max_size - len(SPECIALS)]))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], *, max_len: int = 64) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (N, max_len) int64; unknown words map to [UNK]."""
        if max_len < 3:
            raise DataError(f"max_len must be >= 3, got {max_len}")
        index = {t: i for i, t in enumerate(self.tokens)}
        ids = np.full((len(texts), max_len), PAD, dtype=np.int64)
        mask = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            seq = [CLS, *(index.get(t, UNK) for t in tokenize(text))][: max_len - 1] + [SEP]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def to_dict(self) -> dict[str, Any]:
        return {"format": "edgeopt-word-vocab", "version": 1, "tokens": list(self.tokens)}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordVocab:
        p = Path(path)
        try:
            payload = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read vocabulary {p}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != "edgeopt-word-vocab":
            raise DataError(f"{p} is not an edgeopt word vocabulary (written by edgeopt distill)")
        return cls(tuple(payload["tokens"]))


def text_dataset(examples: TextExamples, vocab: WordVocab, *, max_len: int = 64) -> Dataset:
    """Token arrays keyed ``input_ids`` / ``attention_mask`` with the labels, ready for training and ONNX."""
    return Dataset(vocab.encode(examples.texts, max_len=max_len), examples.labels, source=examples.source)
