"""The user's own small student from the distillation issue: three 3x3 convolutions and a global
average pool, 14.5K parameters (26x fewer than the bundled 372K digits CNN teacher).

Used by benchmarks/distill.py as ``benchmarks/digits_student.py:build``.
"""

from __future__ import annotations

from torch import nn


def build(classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    return nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, classes))
