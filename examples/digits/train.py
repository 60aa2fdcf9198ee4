"""Train the bundled digits CNN deterministically and write the example files.

Writes, beside this script: ``train.npz`` / ``test.npz`` (sklearn digits at 1x32x32, a fixed
stratified 70/30 split), ``digits_cnn.pt`` (state_dict) and ``digits_cnn.onnx`` (dynamic batch).
Run: ``python examples/digits/train.py`` (needs ``pip install 'edgeopt[torch,sklearn]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_cnn import INPUT_SHAPE, DigitsCNN  # noqa: E402

from edgeopt.data import load_data, save_npz  # noqa: E402


def main(epochs: int = 20, seed: int = 0) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    data = load_data("sklearn:digits", input_size=INPUT_SHAPE[1:])
    train, test = data.split(0.7, seed=seed)
    save_npz(HERE / "train.npz", train)
    save_npz(HERE / "test.npz", test)

    model = DigitsCNN()
    x = torch.from_numpy(train.inputs["x"])
    y = torch.from_numpy(train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = perm[start:start + 64]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(test.inputs["x"])).argmax(1).numpy() == test.labels).mean()
        print(f"epoch {epoch + 1:2d} loss {loss.item():.4f} test accuracy {acc:.4f}")

    torch.save(model.state_dict(), HERE / "digits_cnn.pt")
    example = torch.zeros(INPUT_SHAPE)
    torch.onnx.export(model, (example,), str(HERE / "digits_cnn.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(HERE / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"input": test.inputs["x"]})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(test.inputs["x"])).numpy()
    print(f"onnx vs torch max abs diff {np.abs(onnx_out - torch_out).max():.2e}; "
          f"onnx test accuracy {(onnx_out.argmax(1) == test.labels).mean():.4f}")


if __name__ == "__main__":
    main()
