"""Distillation choices: which temperature and alpha, whether to distil at all, and for how long.

Distillation does not always pay. A student 20x or more smaller than a near-certain teacher
can fail to follow its soft targets at T=4 and end below the same student trained on labels
alone (the capacity gap, Cho & Hariharan 2019; Mirzadeh et al. 2020). So a distillation run
trains a few candidates from the same initial weights:

- the same student on the labels alone (the baseline, itself a candidate);
- the student distilled at each (temperature, alpha) of a small grid, T in {1, 2, 4} x alpha in
  {0.3, 0.7}, unless the user fixed them (then exactly what they gave);
- when the student is 10x or more smaller than the teacher, the student distilled from an
  intermediate catalogue network that was distilled from the teacher first (a "teacher
  assistant", TAKD, Mirzadeh et al. 2020).

The one shipped is the best by accuracy on the validation split; a distilled candidate has to
beat the labels-only one there (a tie ships the labels-only student: nothing was gained).
Every candidate's figures go into the report, and the accuracy the report states comes from
data that chose nothing (neither the epoch nor the candidate).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from edgeopt.errors import ConfigError

TEMPERATURES = (1.0, 2.0, 4.0)
ALPHAS = (0.3, 0.7)
LABELS_ONLY = "labels-only"
AUTO = "auto"
AUTO_MAX_EPOCHS = 100  # ``--epochs auto`` stops on the plateau long before this
AUTO_PATIENCE = 5
AUTO_BUDGET_SECONDS = 1800.0  # all candidates together, unless the user gives --time-budget
CAPACITY_GAP = 10.0  # student this many times smaller than the teacher: try a teacher assistant


def check_epochs(epochs: int | str) -> None:
    """``epochs`` is a positive int or ``"auto"`` (train until the validation curve plateaus); the
    one check is :class:`edgeopt.training.TrainSettings`'s."""
    from edgeopt.training import TrainSettings

    TrainSettings(epochs=epochs).require_epochs(minimum=1, auto=True)


def parse_epochs(text: str) -> int | str:
    """The CLI's ``--epochs`` value: ``auto`` or an integer >= 1."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    try:
        epochs = int(value)
    except ValueError:
        raise ConfigError(f"--epochs must be an integer >= 1 or 'auto', got {text!r}") from None
    check_epochs(epochs)
    return epochs


def kd_settings(temperature: float | None, alpha: float | None, *, labels: bool,
                default_temperature: float = 4.0) -> list[tuple[float, float]]:
    """The (temperature, alpha) pairs to try: the grid, with any value the user gave held fixed.

    Without labels only alpha 1 (teacher only) is possible, and nothing can be compared on the
    validation split, so one temperature is used (the user's, else ``default_temperature``)."""
    if not labels:
        return [(float(temperature) if temperature is not None else default_temperature, 1.0)]
    temps = TEMPERATURES if temperature is None else (float(temperature),)
    alphas = ALPHAS if alpha is None else (float(alpha),)
    return [(t, a) for t in temps for a in alphas]


def train_schedule(epochs: int | str, *, patience: int | None, time_budget: float | None, runs: int
                   ) -> dict[str, Any]:
    """TrainConfig fields for one candidate: a fixed number of epochs (cosine decay), or ``auto``
    (plateau schedule: up to AUTO_MAX_EPOCHS, stop after ``patience`` epochs without a better
    validation accuracy); the time budget is shared equally by the ``runs`` trainings."""
    budget = time_budget if time_budget is not None else (AUTO_BUDGET_SECONDS if epochs == AUTO else None)
    per_run = budget / max(1, runs) if budget is not None else None
    if epochs == AUTO:
        return {"epochs": AUTO_MAX_EPOCHS, "patience": patience or AUTO_PATIENCE, "schedule": "plateau",
                "max_seconds": per_run}
    return {"epochs": int(epochs), "patience": patience, "schedule": "cosine", "max_seconds": per_run}


@dataclass
class KdCandidate:
    """One trained student: labels only, distilled from the teacher, or from a teacher assistant."""

    name: str
    teacher: str  # "none", "teacher" or "assistant <catalogue name>"
    temperature: float | None = None
    alpha: float | None = None
    val_accuracy: float | None = None
    best_epoch: int = 0
    epochs_run: int = 0
    stopped: str = ""
    seconds: float = 0.0
    test_accuracy: float | None = None
    assistant: dict[str, Any] | None = None  # the teacher assistant's name, size and validation accuracy
    module: Any = field(default=None, repr=False)
    fit: Any = field(default=None, repr=False)

    @property
    def distilled(self) -> bool:
        return self.teacher != "none"

    def record(self, fitted: Any) -> None:
        self.fit = fitted
        self.val_accuracy = fitted.best_val_accuracy
        self.best_epoch, self.epochs_run = fitted.best_epoch, fitted.epochs_run
        self.stopped, self.seconds = fitted.stopped, round(fitted.seconds, 2)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher, "temperature": self.temperature, "alpha": self.alpha,
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "stopped": self.stopped,
                "train_seconds": self.seconds, **({"assistant": self.assistant} if self.assistant else {})}


def candidate_name(temperature: float, alpha: float, *, via: str | None = None) -> str:
    base = f"T={temperature:g} alpha={alpha:g}"
    return f"{base} via {via}" if via else base


def pick(candidates: list[KdCandidate]) -> KdCandidate:
    """The best by validation accuracy; ties go to the labels-only student, then to the earlier candidate."""
    if not candidates:
        raise ValueError("no candidates")

    def key(c: KdCandidate) -> tuple[float, int]:
        return (c.val_accuracy if c.val_accuracy is not None else -1.0, 0 if c.distilled else 1)

    best = candidates[0]
    for c in candidates[1:]:
        if key(c) > key(best):
            best = c
    return best


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def choice_notes(chosen: KdCandidate, candidates: list[KdCandidate], *, epochs: int | str,
                 test_source: str) -> list[str]:
    """The notes a user must read: distillation lost (and what shipped), the shipped student was
    still improving, the shipped student is below the baseline on the test data."""
    notes = []
    baseline = next((c for c in candidates if not c.distilled), None)
    distilled = [c for c in candidates if c.distilled]
    if baseline is not None and distilled and chosen is baseline:
        best = pick(distilled)
        notes.append(f"distillation did not beat training on labels alone: the best distilled student ({best.name}) "
                     f"scored {_pct(best.val_accuracy)} on the validation split, the labels-only student "
                     f"{_pct(baseline.val_accuracy)}; shipped the labels-only student")
    if chosen.fit is not None and chosen.fit.best_is_last:
        if chosen.stopped == "time":
            why = "the time budget ran out while it was still improving: give more --time-budget"
        else:
            more = "a larger --time-budget or patience" if epochs == AUTO else "more --epochs or --epochs auto"
            why = f"it was still improving: {more} may give a better model"
        notes.append(f"the shipped student ({chosen.name}) had its best validation accuracy in its last epoch "
                     f"({chosen.best_epoch} of {chosen.epochs_run}); {why}")
    if (baseline is not None and chosen is not baseline and chosen.test_accuracy is not None
            and baseline.test_accuracy is not None and chosen.test_accuracy < baseline.test_accuracy):
        notes.append(f"the shipped distilled student ({chosen.name}) was better on the validation split but scores "
                     f"{_pct(chosen.test_accuracy)} on {test_source} vs {_pct(baseline.test_accuracy)} for labels "
                     "only: the gain did not hold on data that chose nothing")
    return notes


def _row_hashes(data: Any) -> set[bytes]:
    arrays = list(data.inputs.values())
    out = set()
    for i in range(len(data)):
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            h.update(memoryview(a[i].tobytes()))
        out.add(h.digest())
    return out


def overlap_note(test: Any, *, chose: dict[str, Any]) -> str | None:
    """A note when test samples also appear in data that trained or chose (epoch, candidate):
    the accuracy on them is optimistic. ``chose`` maps a role ("training", "validation") to data."""
    if test is None or len(test) == 0:
        return None
    test_rows = _row_hashes(test)
    found = {role: len(test_rows & _row_hashes(d)) for role, d in chose.items() if d is not None}
    parts = [f"{n} in the {role} data" for role, n in found.items() if n]
    if not parts:
        return None
    return (f"{sum(found.values())} of {len(test)} test samples ({test.source}) are also used for training or "
            f"choosing ({', '.join(parts)}): the test accuracy is optimistic; pass --test-data with samples "
            "that chose nothing")


def assistant_for(*, teacher_params: int | None, student_params: int, input_size: tuple[int, ...], classes: int,
                  gap: float = CAPACITY_GAP) -> str | None:
    """A catalogue network between teacher and student for TAKD, when the student is ``gap`` times
    smaller or more: the one nearest the geometric mean of the two sizes, at least 2x from each."""
    if not teacher_params or teacher_params < gap * student_params:
        return None
    import torch

    from edgeopt.transforms.architectures import build_architecture, list_architectures

    target = math.sqrt(teacher_params * student_params)
    best, best_dist = None, math.inf
    for name in list_architectures():
        try:
            with torch.device("meta"):  # sizes only: no memory, no weight initialisation
                net = build_architecture(name, input_size=input_size, classes=classes)
        except Exception:  # noqa: BLE001 - an entry that cannot take this input is not offered
            continue
        n = sum(p.numel() for p in net.parameters())
        if not 2 * student_params <= n <= teacher_params / 2:
            continue
        dist = abs(math.log(n / target))
        if dist < best_dist:
            best, best_dist = name, dist
    return best
