"""Text data + DistilBERT-style distillation: tokenization, every-other-layer student, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgeopt.errors import DataError, ModelError  # noqa: E402
from edgeopt.text_data import CLS, PAD, SEP, UNK, WordVocab, load_jsonl, tokenize  # noqa: E402
from edgeopt.transforms.distill_text import halve_bert, make_bert_classifier  # noqa: E402

POS, NEG = ["good", "great", "nice"], ["bad", "awful", "poor"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        word = str(rng.choice(POS if label else NEG))
        rows.append({"text": f"the film was {word} .", "label": label})
    return rows


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(120, 0)) + "\n")
    return path


def test_tokenize_and_vocab_are_deterministic():
    assert tokenize("Not BAD, really!") == ["not", "bad", ",", "really", "!"]
    v = WordVocab.build(["b a a", "c b a"])
    assert v.tokens == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c")  # by count, then alphabetically
    enc = v.encode(["a zebra", "c " * 10], max_len=5)
    assert enc["input_ids"].tolist() == [[CLS, 4, UNK, SEP, PAD], [CLS, 6, 6, 6, SEP]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert enc["input_ids"].dtype == np.int64


def test_vocab_round_trips_through_json(tmp_path):
    v = WordVocab.build(["hello world"])
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(v.to_dict()))
    assert WordVocab.load(path) == v
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(DataError, match="not an edgeopt word vocabulary"):
        WordVocab.load(tmp_path / "other.json")


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": 1}\nnot json\n', r"bad.jsonl:2 is not a JSON object"),
    ('{"label": 1}\n', r"bad.jsonl:1 has no string 'text' field"),
    ('{"text": "a", "label": 1}\n{"text": "b"}\n', "1 line\\(s\\) have no 'label'"),
    ('{"text": "a", "label": "pos"}\n', "'label' must be a non-negative integer"),
    ("\n", "has no examples"),
])
def test_jsonl_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_unlabelled_jsonl_loads_without_labels(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c"}\n')
    ex = load_jsonl(path)
    assert ex.texts == ("a b", "c") and ex.labels is None


def test_halve_bert_takes_every_other_layer():
    teacher = make_bert_classifier(vocab_size=50, layers=4, hidden=32, heads=2, max_len=16, classes=3)
    student = halve_bert(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for si, ti in ((0, 0), (1, 2)):
        key = f"bert.encoder.layer.{si}.attention.self.query.weight"
        assert torch.equal(s[key], t[key.replace(f"layer.{si}.", f"layer.{ti}.")])
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[key], t[key])
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_layer = sum(v.numel() for k, v in t.items() if k.startswith("bert.encoder.layer.0."))
    assert params(teacher) - params(student) == 2 * per_layer


def test_halve_bert_refuses_a_non_bert_model():
    with pytest.raises(ModelError, match="not a BERT-style encoder classifier"):
        halve_bert(torch.nn.Linear(3, 2))


@pytest.mark.slow
def test_cli_distills_a_saved_teacher_folder(cli, tmp_path, jsonl):
    from edgeopt.model import load_model

    examples = load_jsonl(jsonl)
    vocab = WordVocab.build(examples.texts)
    teacher = make_bert_classifier(vocab_size=len(vocab), layers=4, hidden=32, heads=2, intermediate=64,
                                   max_len=16, classes=2)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    out = tmp_path / "student.onnx"
    result = cli("distill", "--teacher", folder, "--student", "half", "--data", jsonl, "-o", out, "--epochs", "1",
                 "--max-len", "16", "--feature-loss", "--no-baseline", "--bench-seconds", "0.1", "--threads", "1",
                 "--temperature", "2", "--alpha", "0.7")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["teacher"]["layers"] == 4 and report["student"]["layers"] == 2
    assert report["config"]["hidden_weight"] == 1.0 and report["config"]["max_len"] == 16
    assert report["ratios"]["params"] > 1.0 and report["student"]["accuracy"] is not None
    # the halved teacher's accuracy before any training, on the same held-out split
    from edgeopt.text_data import text_dataset as to_dataset
    from edgeopt.training import accuracy_torch

    # (the test split is held out first, with seed + 1; the validation split chose the epoch)
    held_out = to_dataset(examples, vocab, max_len=16).split(0.85, seed=1)[1]
    assert report["data"]["test"] == len(held_out) and report["candidates"][0]["name"] == "T=2 alpha=0.7"
    assert report["student"]["accuracy_before_training"] == accuracy_torch(halve_bert(teacher), held_out)
    student = load_model(out)
    assert [i.name for i in student.inputs] == ["input_ids", "attention_mask"]
    assert WordVocab.load(out.with_suffix(".vocab.json")) == vocab
    # the ONNX student computes what the saved state_dict computes
    from edgeopt.measure.evaluate import predict
    from edgeopt.text_data import text_dataset
    from edgeopt.transforms.distill_text import predict_text

    module = halve_bert(teacher)
    module.load_state_dict(torch.load(out.with_suffix(".pt"), weights_only=True))
    expected = predict_text(module, examples, vocab, max_len=16)
    got = predict(student, text_dataset(examples, vocab, max_len=16))
    assert np.allclose(got, expected, atol=1e-3)


def test_cli_text_errors_exit_2(cli, tmp_path, jsonl):
    teacher = make_bert_classifier(vocab_size=8, layers=2, hidden=16, heads=2, max_len=16, classes=2)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "good"}\n{"text": "bad"}\n')
    cases = [
        (["--student", "half", "--data", unlabelled, "--alpha", "0.7"],
         "has no labels but alpha 0.7 < 1 asks for the hard-label loss"),
        (["--student", "half", "--data", unlabelled, "--epochs", "auto"],
         "has no labels: --epochs auto watches the validation accuracy"),
        (["--student", "mobilenet_v3_small", "--data", jsonl], "use --student half"),
        (["--student", "half", "--data", jsonl], "the vocabulary has 14 tokens but the teacher's embedding has 8"),
        (["--student", "half", "--data", jsonl, "--augment-shift", "2"], "--augment-shift shifts images"),
        (["--student", "half", "--data", jsonl, "--warmup", "1"], "--warmup must be in [0, 1), got 1.0"),
    ]
    for args, message in cases:
        out = tmp_path / "s.onnx"
        result = cli("distill", "--teacher", folder, "--epochs", "1", *args, "-o", out)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
