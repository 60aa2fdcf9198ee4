"""On-device adaptation of the bundled digits CNN to a shifted domain (issue 10 figures).

The digits CNN was trained on clean digits. The local domain is the same digits rotated by 20
degrees with Gaussian noise (sigma 0.03): 200 such samples, made from examples/digits/train.npz,
are all the local data adapt sees. Original-domain data for replay and the held-out check is
another 400 clean training samples. Both test sets are made from examples/digits/test.npz: the
shifted one with the same transform (other noise), the clean one as is; neither is seen in training.

For every strategy (and ``auto``: plain, with ``--max-forget 0.02``, and under two memory budgets) this records: measured peak training
memory, trainable parameters, accuracy on the shifted and the clean test set before and after
(of the exported ONNX, through measure.evaluate), and seconds. The last part kills an adapt run
with SIGKILL mid-training, resumes it, and checks the output loads and is accurate.

Run: ``.venv/bin/python benchmarks/adapt.py`` -> benchmarks/results/adapt.json
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from edgeopt.adapt import STRATEGY_NAMES, AdaptConfig, adapt  # noqa: E402
from edgeopt.data import Dataset, load_data, save_npz  # noqa: E402
from edgeopt.errors import BudgetNotMet  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.evaluate import evaluate  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
SPEC = f"{DIGITS / 'digits_cnn.py'}:DigitsCNN"
WEIGHTS = DIGITS / "digits_cnn.pt"
ANGLE, NOISE, LOCAL_N, ORIGINAL_N, REPLAY = 20.0, 0.03, 200, 400, 300
MAX_FORGET = 0.02  # auto with --max-forget: falls back to a less capable strategy when one forgets more


def shifted(data: Dataset, *, seed: int, angle: float = ANGLE, noise: float = NOISE) -> Dataset:
    """Rotate every image by ``angle`` degrees and add Gaussian noise: another camera, another hand."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = data.inputs["x"]
    rotated = np.stack([ndimage.rotate(img[0], angle, reshape=False, order=1)[None] for img in x])
    noisy = np.clip(rotated + rng.normal(0.0, noise, rotated.shape), 0.0, 1.0).astype(np.float32)
    return Dataset(inputs={"x": noisy}, labels=data.labels, source=f"{data.source} (rotated {angle:g}, noise {noise:g})")


def domains(seed: int = 0) -> dict[str, Dataset]:
    train = load_data(DIGITS / "train.npz")
    test = load_data(DIGITS / "test.npz")
    order = np.random.default_rng(seed).permutation(len(train))
    return {"local": shifted(train.take(order[:LOCAL_N]), seed=seed + 1),
            "original": train.take(order[LOCAL_N:LOCAL_N + ORIGINAL_N]),
            "test_shifted": shifted(test, seed=seed + 2), "test_clean": test}


def accuracy(model: object, data: Dataset) -> float:
    return float(evaluate(model, data, threads=1).accuracy)  # type: ignore[arg-type]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    d = domains()
    base_torch = load_model(SPEC, weights=WEIGHTS)
    base_onnx = load_model(DIGITS / "digits_cnn.onnx")
    before = {"shifted": accuracy(base_onnx, d["test_shifted"]), "clean": accuracy(base_onnx, d["test_clean"])}
    rows = []
    for name, max_forget in [*((n, None) for n in STRATEGY_NAMES), ("auto", None), ("auto", MAX_FORGET)]:
        cfg = AdaptConfig(strategy=name, replay=REPLAY, max_forget=max_forget, train=TrainSettings(epochs=20))
        t0 = time.perf_counter()
        result = adapt(base_torch, d["local"], config=cfg, original=d["original"], progress=False)
        seconds = time.perf_counter() - t0
        after = {"shifted": accuracy(result.model, d["test_shifted"]), "clean": accuracy(result.model, d["test_clean"])}
        rows.append({"strategy": name, "max_forget": max_forget, "chosen": result.report["strategy"]["name"],
                     "attempts": [{"strategy": a["strategy"], "rollback_reason": a["rollback_reason"]}
                                  for a in result.report["attempts"]],
                     "peak_memory_mb": result.report["peak_memory_mb"],
                     "trainable_params": result.report["trainable_params"],
                     "shifted_test_before": before["shifted"], "shifted_test_after": after["shifted"],
                     "shifted_gain_pt": round(100 * (after["shifted"] - before["shifted"]), 2),
                     "clean_test_before": before["clean"], "clean_test_after": after["clean"],
                     "clean_drop_pt": round(100 * (before["clean"] - after["clean"]), 2),
                     "rolled_back": result.rolled_back, "epochs_run": result.report["training"]["epochs_run"],
                     "seconds": round(seconds, 1)})
        print(f"{name:11s} {max_forget or '':4} -> {rows[-1]['chosen']:10s} peak {rows[-1]['peak_memory_mb']:7.2f} MB  params {rows[-1]['trainable_params']:7d}  "
              f"shifted {100 * before['shifted']:.1f} -> {100 * after['shifted']:.1f}  "
              f"clean {100 * before['clean']:.1f} -> {100 * after['clean']:.1f}  {seconds:.1f}s", flush=True)
    auto_table, auto_forget = rows[-2], rows[-1]
    budgets = []
    peaks = {r["strategy"]: r["peak_memory_mb"] for r in rows if r["strategy"] != "auto"}
    for budget in (round((peaks["bias-last"] + peaks["sparse"]) / 2, 1), round(min(peaks.values()) / 2, 1)):
        try:
            r = adapt(base_torch, d["local"], config=AdaptConfig(memory_mb=budget, replay=REPLAY, train=TrainSettings(epochs=20)),
                      original=d["original"], progress=False)
            budgets.append({"memory_mb": budget, "chosen": r.report["strategy"]["name"],
                            "measured_peak_mb": r.report["peak_memory_mb"],
                            "under_budget": r.report["peak_memory_mb"] <= budget})
        except BudgetNotMet as exc:
            budgets.append({"memory_mb": budget, "chosen": None, "error": str(exc), "exit_code": exc.exit_code})
        print("budget", budgets[-1], flush=True)
    resume = kill_and_resume(d)
    print("kill/resume", resume, flush=True)
    payload = {"benchmark": "adapt", "machine_note": "2 shared CPU cores, loaded by other jobs; times are indicative",
               "shift": {"rotation_deg": ANGLE, "noise_sigma": NOISE, "local_samples": LOCAL_N,
                         "original_samples": ORIGINAL_N, "replay": REPLAY},
               "before": before, "strategies": rows, "auto": auto_table, "auto_with_max_forget": auto_forget,
               "memory_budgets": budgets,
               "kill_and_resume": resume}
    write_json(ROOT / "benchmarks" / "results" / "adapt.json", payload)


def kill_and_resume(d: dict[str, Dataset]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local.npz"
        save_npz(local, d["local"])
        out = Path(tmp) / "adapted.onnx"
        ckpt = Path(tmp) / "adapted.onnx.ckpt.pt"
        cmd = [sys.executable, "-m", "edgeopt", "adapt", SPEC, "--weights", str(WEIGHTS), "--data", str(local),
               "-o", str(out), "--strategy", "full", "--epochs", "200"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        killed_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out_after_kill = out.exists()
        resumed = subprocess.run([*cmd[:-2], "--epochs", "5", "--resume"], env=env, capture_output=True, text=True)
        model = load_model(out) if out.exists() else None
        return {"killed_while_running": killed_running, "checkpoint_existed": ckpt.exists(),
                "output_existed_after_kill": out_after_kill, "resume_exit_code": resumed.returncode,
                "resumed_model_loads": model is not None,
                "resumed_shifted_accuracy": accuracy(model, d["test_shifted"]) if model is not None else None}


if __name__ == "__main__":
    main()
