"""The one training loop: LR warm-up, random-shift augmentation, and a teacher run on the same view."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.errors import ConfigError  # noqa: E402
from edgeopt.training import TrainConfig, TrainSettings, _lr_factor, _Shift, accuracy_torch, fit  # noqa: E402


def _images(n: int = 96, seed: int = 0) -> Dataset:
    """Bright square in the left or right half of an 8x8 image: label = side (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.05, (n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i, side in enumerate(y):
        col = 1 if side == 0 else 5
        x[i, 0, 2:5, col:col + 2] += 1.0
    return Dataset({"x": x}, y.astype(np.int64), source="squares")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_lr_factor_warms_up_linearly_then_follows_the_per_epoch_cosine():
    f = _lr_factor(TrainConfig(train=TrainSettings(epochs=2, warmup=0.5)), steps_per_epoch=5)  # 5 warm-up steps of 10
    assert [round(f(s), 6) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(5) == pytest.approx(0.5)  # epoch 1 of 2: cos(pi / 2) -> half the rate
    plain = _lr_factor(TrainConfig(train=TrainSettings(epochs=4)), steps_per_epoch=3)
    # without warm-up this is torch's CosineAnnealingLR stepped per epoch, as the loop always had
    assert [plain(s) for s in (0, 2, 3, 6, 9)] == pytest.approx([1.0, 1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5,
                                                                 (1 + np.cos(3 * np.pi / 4)) / 2])


def test_shift_moves_each_image_within_its_edge_padded_frame():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    shift = _Shift(torch, {"x": x, "ids": torch.zeros(2, 3, dtype=torch.long)}, 2, seed=0)
    assert shift.keys == ["x"]  # integer or non-image inputs are left alone
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    windows = [{(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out_i, padded[i, :, dy:dy + 6, dx:dx + 6])}
               for out in [shift({"x": x})["x"] for _ in range(8)] for i, out_i in enumerate(out)]
    assert all(len(w) == 1 for w in windows)  # every output is exactly one shifted crop
    assert len({next(iter(w)) for w in windows}) > 3  # and the offsets vary
    again = _Shift(torch, {"x": x}, 2, seed=0)
    assert torch.equal(_Shift(torch, {"x": x}, 2, seed=0)({"x": x})["x"], again({"x": x})["x"])  # seeded


def test_shift_needs_image_inputs():
    with pytest.raises(ConfigError, match=r"needs image inputs shaped \(N, C, H, W\)"):
        _Shift(torch, {"ids": torch.zeros(4, 7, dtype=torch.long)}, 1, seed=0)


def test_teacher_sees_exactly_the_augmented_batch_the_student_trains_on():
    data = _images()
    seen_by_teacher, seen_by_student = [], []
    teacher_net = _net()

    def teacher(batch):
        seen_by_teacher.append(batch["x"].clone())
        return teacher_net(batch["x"])

    student = _net()
    student.register_forward_pre_hook(lambda _m, args: seen_by_student.append(args[0].clone()) if _m.training else None)
    fit(student, data, config=TrainConfig(augment_shift=2, alpha=0.5, train=TrainSettings(epochs=2, batch_size=32)), teacher=teacher,
        progress=False)
    assert len(seen_by_teacher) == len(seen_by_student) == 6  # 2 epochs x 3 batches
    assert all(torch.equal(t, s) for t, s in zip(seen_by_teacher, seen_by_student, strict=True))
    originals = torch.from_numpy(data.inputs["x"]).flatten(1)
    rows = torch.cat(seen_by_student).flatten(1)
    unshifted = sum(bool((originals == r).all(dim=1).any()) for r in rows)
    assert unshifted < len(rows) / 4  # the views really are shifted (offset 0 has odds 1/25)


def test_warm_up_and_augmentation_still_learn():
    data, test = _images(192, seed=0), _images(200, seed=1)
    net = _net()
    fit(net, data, config=TrainConfig(augment_shift=1, train=TrainSettings(epochs=15, lr=1e-2, batch_size=32, warmup=0.2)), progress=False)
    assert accuracy_torch(net, test) > 0.95


def test_bad_combinations_are_config_errors():
    data = _images(32)
    logits = np.zeros((32, 2), np.float32)
    with pytest.raises(ConfigError, match="not both"):
        fit(_net(), data, teacher_logits=logits, teacher=lambda b: torch.zeros(len(b["x"]), 2), progress=False)
    with pytest.raises(ConfigError, match="augmentation needs the teacher itself"):
        fit(_net(), data, config=TrainConfig(augment_shift=1), teacher_logits=logits, progress=False)
    with pytest.raises(ConfigError, match=r"--warmup must be in \[0, 1\), got 1.0"):
        TrainConfig(train=TrainSettings(warmup=1.0))
    with pytest.raises(ConfigError, match="augment shift"):
        TrainConfig(augment_shift=-1)


def test_plateau_schedule_stops_when_validation_stalls_and_halves_the_rate():
    """--epochs auto: up to 100 epochs, but it stops ``patience`` epochs after the best one."""
    data, val = _images(96, seed=0), _images(64, seed=1)
    net = _net()
    cfg = TrainConfig(schedule="plateau", train=TrainSettings(epochs=100, lr=1e-2, batch_size=32, patience=3))
    result = fit(net, data, config=cfg, validation=val, progress=False)
    assert result.stopped == "patience" and result.epochs_run < 100
    assert result.epochs_run == result.best_epoch + 3  # the squares task is learnt in a few epochs
    assert result.best_val_accuracy == 1.0 and accuracy_torch(net, val) == 1.0  # best weights restored
    assert not result.best_is_last
    # the multiplier halves after patience // 2 = 1 stale epoch, then after each further one
    scale = [1.0]
    factor = _lr_factor(cfg, steps_per_epoch=3, plateau_scale=scale)
    assert factor(0) == 1.0
    scale[0] = 0.25
    assert factor(7) == 0.25


def test_time_budget_stops_training_and_says_so():
    data, val = _images(96, seed=0), _images(32, seed=1)
    result = fit(_net(), data, config=TrainConfig(schedule="plateau", max_seconds=1e-6, train=TrainSettings(epochs=100, patience=50)),
                 validation=val, progress=False)
    assert result.stopped == "time" and result.epochs_run == 1
    with pytest.raises(ConfigError, match="plateau schedule needs a patience"):
        TrainConfig(schedule="plateau")
    with pytest.raises(ConfigError, match="needs labelled validation data"):
        fit(_net(), data, config=TrainConfig(schedule="plateau", train=TrainSettings(patience=2)), progress=False)


def test_train_settings_one_check_for_every_technique():
    """Every config that trains takes the same TrainSettings: one check, one error type, one message shape."""
    from edgeopt.adapt import AdaptConfig
    from edgeopt.transforms.distill import Distill
    from edgeopt.transforms.distill_text import DistillText
    from edgeopt.transforms.prune import StructuredPrune, UnstructuredPrune
    from edgeopt.transforms.qat import QatConfig

    bad = [({"lr": 0}, "--lr must be > 0, got 0"), ({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
           ({"seed": -1}, "--seed must be an integer >= 0, got -1"), ({"patience": 0}, "--patience must be an integer >= 1"),
           ({"weight_decay": -1.0}, "--weight-decay must be >= 0"), ({"epochs": -2}, "--epochs must be an integer >= 0")]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            TrainSettings(**fields)
    for cls in (TrainConfig, UnstructuredPrune, StructuredPrune, Distill, DistillText, AdaptConfig, QatConfig):
        with pytest.raises(ConfigError, match="--lr must be > 0"):
            cls(train={"lr": -1.0})
    # fields left out keep each technique's own defaults
    assert Distill(train=TrainSettings(epochs=3)).train == TrainSettings(epochs=3, lr=2e-3, batch_size=64, seed=0,
                                                                         weight_decay=0.0, warmup=0.0)
    assert DistillText().train.lr == 1e-4 and DistillText().train.warmup == 0.1
    assert StructuredPrune().train.epochs == 0 and AdaptConfig().train.epochs == 20
    assert TrainConfig().train.epochs == 5
    # what each technique accepts for epochs beyond the shared range
    with pytest.raises(ConfigError, match="--epochs must be an integer >= 1, got 0"):
        AdaptConfig(train=TrainSettings(epochs=0))
    with pytest.raises(ConfigError, match="--epochs must be an integer >= 0, got 'auto'"):
        StructuredPrune(train=TrainSettings(epochs="auto"))
    assert Distill(train=TrainSettings(epochs="auto")).train.epochs == "auto"
