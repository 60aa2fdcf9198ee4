"""The bundled example model: a 3-layer CNN for 8x8 sklearn digits upsampled to 32x32.

Load it in edgeopt as ``examples/digits/digits_cnn.py:DigitsCNN`` with
``--weights examples/digits/digits_cnn.pt``; the ONNX export is ``digits_cnn.onnx``.
"""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 1, 32, 32)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(1, width, 1), block(width, 2 * width, 2),
                                      block(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
