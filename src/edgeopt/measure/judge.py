"""The judge follows the output: how faithful a model's outputs are to a reference's.

Top-1 agreement only means something for class scores. On anything else (embeddings, hidden
states, detection or regression heads) the argmax is whatever hidden dimension happens to be
largest, often one outlier feature, so any model "agrees" with any other; an INT8 sentence
encoder with cosine 0.58 to the original scored 100 % agreement. So:

- **class scores** (a 2-D ``(N, classes)`` output not named like an embedding) are judged by
  accuracy when labels exist, else by top-1 agreement counted only where the reference's own
  decision is clear (its top-1 probability beats the runner-up by :data:`CONFIDENT_MARGIN`):
  near-ties flip under any change and say nothing about the model. Plain agreement, the mean
  KL divergence and the cosine of the probabilities are reported beside it.
- **every other output** is judged by the cosine of each sample's output to the reference's
  (mean, and the 5th percentile over samples). Padding tokens are left out when the data has
  an ``attention_mask``. For sequence outputs ``(N, tokens, hidden)`` and embeddings, the
  nearest-neighbour agreement of the (mask-)mean-pooled embeddings is what retrieval users
  see: does each sample's nearest other sample stay the same? For a text encoder (the data has an
  attention mask) that is what the budget judges (``neighbours``), with near-ties allowed: a
  sample's nearest neighbour may change only to one the reference rates within :data:`NN_MARGIN`
  of its own nearest (the reference cannot tell those apart either; they flip under any change),
  as agreement for class scores counts only where the reference's decision is clear. Beside it,
  the plain agreement a retrieval user counts, as expected (:func:`nn_expected_agreement`): the
  count itself is a lottery over the near-ties, the expectation is not; the budget never lets it
  fall, beyond its 90 % interval, more than twice the allowed drop (search/budget.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from edgeopt.errors import DataError

OutputKind = Literal["classes", "other"]
# The reference's top-1 probability must beat its runner-up by this much for the sample to count
# in confident agreement (0.1 = ten points of probability).
CONFIDENT_MARGIN = 0.1
# Output names that say "this is a vector, not class scores" even when the output is 2-D.
EMBEDDING_WORDS = ("embed", "hidden", "pool", "feature", "vector", "encod", "state", "token")
MASK_NAMES = ("attention_mask", "input_mask", "mask")
# A sample's nearest neighbour counts as clear when its cosine similarity beats the runner-up's by
# this much; closer calls flip under any change (on 144 real sentences, 28 are within 0.01).
NN_MARGIN = 0.01


def output_kind(outputs: np.ndarray, *, name: str | None = None) -> OutputKind:
    """``classes`` for a 2-D ``(N, C>=2)`` output not named like an embedding, else ``other``.

    Example:
        >>> output_kind(np.zeros((4, 10)))
        'classes'
        >>> output_kind(np.zeros((4, 7, 384)))
        'other'
        >>> output_kind(np.zeros((4, 384)), name="sentence_embedding")
        'other'
    """
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return "other"
    if name and any(w in name.lower() for w in EMBEDDING_WORDS):
        return "other"
    return "classes"


@dataclass
class Fidelity:
    """Fidelity of outputs to a reference's; fields a kind does not use are None.

    ``cosine``/``cosine_p5``/``min_cosine``: per-sample cosine of the raw outputs (mean, 5th
    percentile, minimum). ``confident_agreement`` over the ``n_confident`` samples where the
    reference is clear; ``kl``/``prob_cosine``: of the softmax probabilities (class scores).
    ``nn_agreement``/``embedding_cosine``: of the pooled embeddings (other outputs, N >= 3);
    ``nn_tie_agreement``: NN agreement with near-ties allowed (:func:`nn_tie_agreement`), what a
    ``neighbours`` budget judges; ``nn_confident_agreement``: over the samples whose reference
    neighbour is clear; ``nn_expected_agreement``: plain NN agreement as expected over changes the
    size of these (:func:`nn_expected_agreement`), with ``nn_expected_margin`` its 90 % half-width
    over samples.
    """

    kind: OutputKind
    n: int
    agreement: float
    cosine: float
    cosine_p5: float
    min_cosine: float
    confident_agreement: float | None = None
    n_confident: int | None = None
    kl: float | None = None
    prob_cosine: float | None = None
    nn_agreement: float | None = None
    nn_tie_agreement: float | None = None
    nn_confident_agreement: float | None = None
    n_nn_confident: int | None = None
    nn_expected_agreement: float | None = None
    nn_expected_margin: float | None = None
    embedding_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def value(self, metric: str) -> float:
        """The figure a budget on ``metric`` (agreement, cosine or neighbours) judges."""
        if metric == "cosine":
            return self.cosine
        if metric == "neighbours" and self.nn_agreement is not None:
            return self.nn_tie_agreement if self.nn_tie_agreement is not None else self.nn_agreement
        if self.confident_agreement is not None:
            return self.confident_agreement
        return self.agreement


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)
    return np.where(both_zero, 1.0, np.where(denom > 0, cos, 0.0))


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that already are probabilities are kept; anything else goes through a softmax."""
    x = scores.astype(np.float64)
    if np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def token_mask(outputs: np.ndarray, inputs: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """The (N, tokens) attention mask that fits ``outputs`` of shape (N, tokens, ...), if the data has one."""
    if inputs is None or outputs.ndim < 3:
        return None
    for name in MASK_NAMES:
        mask = inputs.get(name)
        if mask is not None and mask.shape[:2] == outputs.shape[:2]:
            return mask.astype(bool)
    return None


def pooled(outputs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Sentence embeddings: the mean over tokens (real tokens only when ``mask`` is given) of (N, T, H);
    2-D outputs are already one vector a sample."""
    x = outputs.astype(np.float64)
    if x.ndim == 2:
        return x
    x = x.reshape(x.shape[0], x.shape[1], -1)
    if mask is None:
        return x.mean(axis=1)
    m = mask.astype(np.float64)[:, :, None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def _similarities(e: np.ndarray) -> np.ndarray:
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim


def nn_agreement(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same under both embeddings."""
    return float(np.mean(_same(_similarities(embeddings), _similarities(reference))))


def nn_tie_agreement(embeddings: np.ndarray, reference: np.ndarray, *, margin: float = NN_MARGIN) -> float:
    """Share of samples whose nearest other sample under ``embeddings`` is one the reference rates within
    ``margin`` (cosine similarity) of the reference's own nearest: the same neighbour, or a near-tie.

    Example:
        >>> angles = np.radians([0.0, 45.57, 90.0, 134.0, 300.0])  # sample 2: 44.43 and 44.0 degrees away
        >>> ref = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        >>> moved = ref.copy(); moved[2] = [np.cos(np.radians(89.0)), np.sin(np.radians(89.0))]
        >>> round(nn_agreement(moved, ref), 2), nn_tie_agreement(moved, ref)  # its neighbour flips to the tie
        (0.8, 1.0)
    """
    return _tie_agreement(_similarities(embeddings), _similarities(reference), margin)


# How many of a sample's closest competitors (smallest similarity gap to its nearest) set the spread of
# the gap changes in nn_expected_agreement.
NN_SPREAD_NEIGHBOURS = 10


def nn_keep_probabilities(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each sample's probability of keeping its reference nearest neighbour under changes of the size
    ``embeddings`` makes: see :func:`nn_expected_agreement`."""
    return _keep_probabilities(_similarities(embeddings), _similarities(reference))


def nn_expected_agreement(embeddings: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Plain nearest-neighbour agreement as expected, and its 90 % half-width over samples.

    Counting which samples keep their nearest neighbour is a lottery on real data: a sentence whose
    two nearest are 0.0005 cosine apart flips or not by chance, so the count for one INT8 sentence
    encoder moved between 95.9 % and 99.3 % over three sets of 145 sentences while its error stayed
    the same (all-MiniLM-L6-v2). The expectation is steady: for each sample q with nearest b, the model
    changes the gap to a competitor c, ``s_qb - s_qc``, by ``g_qc``; ``sigma_q`` is the root mean square
    of those changes over q's :data:`NN_SPREAD_NEIGHBOURS` closest competitors (the ones that can
    overtake; changes shared by close sentences cancel there, as they do in the count), and q keeps b
    with probability ``prod_c Phi((s_qb - s_qc) / sigma_q)``. On those sentences the expectation moved by
    0.6 pt at most between sets where the count moved by up to 3.4 pt. It tracks the count's mean: 40
    random points in 16-D with noise of 0.03 per dimension, 30 draws: count 0.928 +- 0.035, expectation
    0.934 +- 0.014; a tiny encoder with damaged weights (sentence embeddings crowded in one direction,
    changes shared by neighbours): count 0.967 / 0.950 / 0.900, expectation 0.975 / 0.934 / 0.824 (a
    spread over all competitors, assuming independent changes, read 0.946 / 0.878 / 0.684).

    Example:
        >>> ref = np.random.default_rng(0).standard_normal((40, 16))
        >>> nn_expected_agreement(ref, ref)[0]
        1.0
        >>> noisy = ref + 0.03 * np.random.default_rng(1).standard_normal(ref.shape)
        >>> nn_agreement(noisy, ref), round(nn_expected_agreement(noisy, ref)[0], 3)  # over 30 draws: 0.928, 0.934
        (0.95, 0.935)
    """
    return _mean_and_half(nn_keep_probabilities(embeddings, reference))


def nn_clear(reference: np.ndarray, *, margin: float = NN_MARGIN) -> np.ndarray:
    """Which samples' reference nearest neighbour beats the runner-up by ``margin`` (cosine)."""
    return _clear(_similarities(reference), margin)


def nn_confident(embeddings: np.ndarray, reference: np.ndarray, *, margin: float = NN_MARGIN
                 ) -> tuple[float | None, int]:
    """NN agreement over the samples whose reference nearest neighbour beats the runner-up by ``margin``
    (and how many those are); None when there are none."""
    return _confident(_similarities(embeddings), _similarities(reference), margin)


# The neighbour figures from similarity matrices (the diagonal -inf, see _similarities): fidelity_of
# computes the two matrices once for all of them.
def _same(new: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.argmax(new, axis=1) == np.argmax(ref, axis=1)


def _tie_agreement(new: np.ndarray, ref: np.ndarray, margin: float) -> float:
    pick = np.argmax(new, axis=1)
    return float(np.mean(ref[np.arange(len(ref)), pick] >= ref.max(axis=1) - margin - 1e-12))


def _clear(ref: np.ndarray, margin: float) -> np.ndarray:
    top2 = np.sort(ref, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= margin


def _confident(new: np.ndarray, ref: np.ndarray, margin: float) -> tuple[float | None, int]:
    clear = _clear(ref, margin)
    return (float(np.mean(_same(new, ref)[clear])) if clear.any() else None), int(clear.sum())


def _keep_probabilities(new: np.ndarray, ref: np.ndarray) -> np.ndarray:
    n = len(ref)
    rows = np.arange(n)
    best = np.argmax(ref, axis=1)
    gaps = ref[rows, best][:, None] - ref  # >= 0; the diagonal is +inf (ref's is -inf)
    gaps[rows, best] = np.inf
    with np.errstate(invalid="ignore"):  # the diagonals are -inf
        change = new - ref
    k = max(1, min(NN_SPREAD_NEIGHBOURS, n - 2))
    near = np.argpartition(gaps, k - 1, axis=1)[:, :k]  # the closest competitors: n - 2 finite gaps a row
    gap_change = change[rows, best][:, None] - change[rows[:, None], near]
    spread = np.sqrt(np.mean(gap_change ** 2, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(spread[:, None] > 0, gaps / spread[:, None], np.where(gaps > 0, np.inf, 0.0))
    close = z < 8.0  # beyond 8 spreads a competitor never overtakes (Phi(8) = 1 - 6e-16)
    log_keep = np.zeros(n)
    r, c = np.nonzero(close)
    phi = 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in z[r, c]])
    np.add.at(log_keep, r, np.log(np.maximum(phi, 1e-300)))
    return np.exp(log_keep)


def _mean_and_half(keep: np.ndarray) -> tuple[float, float]:
    """The mean of per-sample keep probabilities and its 90 % half-width over samples."""
    half = 1.645 * float(keep.std(ddof=1)) / math.sqrt(len(keep)) if len(keep) > 1 else 0.0
    return float(keep.mean()), half


def fidelity_of(outputs: np.ndarray, reference: np.ndarray, *, kind: OutputKind | None = None,
                mask: np.ndarray | None = None) -> Fidelity:
    """How faithful ``outputs`` are to ``reference`` (same shape), judged as the output kind asks.

    Args:
        outputs, reference: (N, ...) outputs of the model under test and of the reference.
        kind: ``classes`` or ``other``; default :func:`output_kind` of ``reference``.
        mask: (N, tokens) attention mask for sequence outputs: padding is left out of cosine and pooling.

    Raises:
        DataError: outputs and reference of different shapes.

    Example:
        >>> ref = np.random.default_rng(0).standard_normal((8, 5, 16))
        >>> f = fidelity_of(ref * 1.01, ref)
        >>> f.kind, round(f.cosine, 6), f.nn_agreement
        ('other', 1.0, 1.0)
    """
    if outputs.shape != reference.shape:
        raise DataError(f"outputs have shape {outputs.shape[1:]} but the reference's are {reference.shape[1:]}; "
                        "compare models with the same outputs")
    if len(outputs) == 0:
        raise DataError("no outputs to compare")
    kind = kind or output_kind(reference)
    a, b = outputs, reference
    if mask is not None and a.ndim >= 3 and mask.shape == a.shape[:2]:
        keep = mask.astype(a.dtype).reshape(mask.shape + (1,) * (a.ndim - 2))
        a, b = a * keep, b * keep
    ra, rb = _rows(a), _rows(b)
    cos = _row_cosine(ra, rb)
    agreement = float(np.mean(np.argmax(ra, axis=1) == np.argmax(rb, axis=1)))
    f = Fidelity(kind=kind, n=len(outputs), agreement=agreement, cosine=float(np.mean(cos)),
                 cosine_p5=float(np.percentile(cos, 5)), min_cosine=float(np.min(cos)))
    if kind == "classes":
        p, q = probabilities(_rows(outputs)), probabilities(_rows(reference))
        top2 = np.sort(q, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN
        same = np.argmax(p, axis=1) == np.argmax(q, axis=1)
        f.n_confident = int(clear.sum())
        f.confident_agreement = float(np.mean(same[clear])) if clear.any() else None
        f.kl = float(np.mean(np.sum(q * (np.log(np.maximum(q, 1e-30)) - np.log(np.maximum(p, 1e-30))), axis=1)))
        f.prob_cosine = float(np.mean(_row_cosine(p, q)))
    else:
        ea, eb = pooled(outputs, mask), pooled(reference, mask)
        f.embedding_cosine = float(np.mean(_row_cosine(ea, eb)))
        if len(outputs) >= 3:
            new, ref = _similarities(ea), _similarities(eb)
            f.nn_agreement = float(np.mean(_same(new, ref)))
            f.nn_tie_agreement = _tie_agreement(new, ref, NN_MARGIN)
            f.nn_confident_agreement, f.n_nn_confident = _confident(new, ref, NN_MARGIN)
            f.nn_expected_agreement, f.nn_expected_margin = _mean_and_half(_keep_probabilities(new, ref))
    return f
