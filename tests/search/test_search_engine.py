"""The choice rules: budget, never slower, noise ties, Pareto front, recipe serialization."""

from dataclasses import dataclass

import pytest

from edgeopt.errors import ConfigError
from edgeopt.search.budget import Budget
from edgeopt.search.engine import CandidateResult, choose, pareto_front
from edgeopt.search.recipe import Recipe
from edgeopt.transforms.config import config_from_dict, config_to_dict, register_config


def result(name: str, *, p50: float, size: int, acc: float, drop: float, status: str = "rejected",
           base_p50: float = 1.0, base_size: int = 1000, ok_budget: bool = True) -> CandidateResult:
    return CandidateResult(name=name, recipe={}, size_bytes=size, latency_ms={"p50": p50, "p99": p50},
                           speedup=base_p50 / p50, size_ratio=base_size / size, accuracy=acc, agreement=acc,
                           drop=drop, meets_budget=ok_budget, status=status, model=None, model_memory_mb=1.0)


BASE = result("original", p50=1.0, size=1000, acc=0.99, drop=0.0, status="baseline")


def nn_result(name: str, *, p50: float, cosine: float, expected: float, margin: float) -> CandidateResult:
    """A text encoder's variant that keeps every neighbour up to near-ties, with its expected plain NN agreement."""
    r = result(name, p50=p50, size=100, acc=1.0, drop=0.0)
    r.cosine, r.nn_expected_agreement, r.nn_expected_margin = cosine, expected, margin
    return r


def test_fastest_within_budget_is_chosen_and_others_say_why() -> None:
    fast_bad = result("fast-but-inaccurate", p50=0.3, size=250, acc=0.90, drop=0.09, ok_budget=False)
    good = result("good", p50=0.5, size=260, acc=0.985, drop=0.005)
    slower = result("slower", p50=1.4, size=500, acc=0.99, drop=0.0)
    same = result("same-speed", p50=0.99, size=900, acc=0.99, drop=0.0)
    chosen = choose(BASE, [fast_bad, good, slower, same], objective="latency", budget=Budget(max_drop=0.01))
    assert chosen is good and good.status == "chosen"
    assert "exceeds the budget" in fast_bad.reason
    assert slower.status == "rejected" and "slower than the original" in slower.reason
    assert "not faster" in same.reason


def test_a_gain_within_the_noise_of_the_interleaved_rounds_is_not_faster() -> None:
    lucky = result("lucky", p50=0.93, size=900, acc=0.99, drop=0.0)  # 1.075x by the p50 ratio alone
    lucky.speedup_interval = [0.97, 1.16]
    steady = result("steady", p50=0.5, size=900, acc=0.985, drop=0.005)
    steady.speedup_interval = [1.9, 2.1]
    assert choose(BASE, [lucky, steady], objective="latency", budget=Budget(max_drop=0.01)) is steady
    assert lucky.reason == ("not reliably faster than the original (1.08x, 90% interval 0.97-1.16x over the "
                            "interleaved rounds)")
    assert choose(BASE, [lucky], objective="latency", budget=Budget(max_drop=0.01)) is None
    lucky.speedup_interval = None  # too few rounds to tell: the p50 ratio decides, as before
    assert choose(BASE, [lucky], objective="latency", budget=Budget(max_drop=0.01)) is lucky


def test_never_chooses_a_slower_model_even_for_size() -> None:
    small_slow = result("small-slow", p50=3.0, size=100, acc=0.99, drop=0.0)
    assert choose(BASE, [small_slow], objective="size", budget=Budget()) is None
    assert "slower" in small_slow.reason


def test_size_objective_prefers_smallest() -> None:
    a = result("a", p50=0.5, size=400, acc=0.99, drop=0.0)
    b = result("b", p50=0.9, size=200, acc=0.99, drop=0.0)
    assert choose(BASE, [a, b], objective="size", budget=Budget()) is b


def test_ties_within_noise_go_to_the_more_accurate() -> None:
    a = result("a", p50=0.50, size=300, acc=0.980, drop=0.01)
    b = result("b", p50=0.51, size=300, acc=0.988, drop=0.002)
    assert choose(BASE, [a, b], objective="latency", budget=Budget(max_drop=0.02)) is b
    assert "within 5%" in a.reason


def test_sizes_a_few_bytes_apart_are_one_size_and_the_faster_wins() -> None:
    # the same weights with another run-time setting: a few metadata bytes apart, tied on speed and accuracy
    slower = result("dq64", p50=0.50, size=100_000, acc=0.99, drop=0.0)
    faster = result("dq128", p50=0.48, size=100_001, acc=0.99, drop=0.0)
    assert choose(BASE, [slower, faster], objective="latency", budget=Budget(max_drop=0.01)) is faster
    # a really smaller one (2 %) still wins the tie
    smaller = result("small", p50=0.50, size=98_000, acc=0.99, drop=0.0)
    assert choose(BASE, [smaller, faster], objective="latency", budget=Budget(max_drop=0.01)) is smaller


def test_ties_on_speed_size_and_judge_go_to_the_more_faithful() -> None:
    # a saturated judge (both keep every neighbour), one size, 3 % apart on p50: what the harness cannot tell
    # apart; the variant whose outputs are closer to the original's wins (cosine loss 0.0005 vs 0.0011)
    plain = result("dq128", p50=0.480, size=100_000, acc=0.99, drop=0.0)
    smooth = result("smoothquant-dq128", p50=0.494, size=100_001, acc=0.99, drop=0.0)
    plain.cosine, smooth.cosine = 0.9989, 0.9995
    assert choose(BASE, [plain, smooth], objective="latency", budget=Budget(max_drop=0.01)) is smooth
    assert "further from the original than (mean cosine 0.99890 vs 0.99950)" in plain.reason
    # cosine losses within 10 % of each other are equally faithful: the faster wins
    smooth.cosine = 0.99885
    assert choose(BASE, [plain, smooth], objective="latency", budget=Budget(max_drop=0.01)) is plain
    assert smooth.reason.endswith("but slower than the chosen one")
    # more than 5 % slower is not a tie: the faster wins however faithful the other
    smooth.cosine, smooth.latency_ms, smooth.speedup = 0.9999, {"p50": 0.52, "p99": 0.52}, 1 / 0.52
    assert choose(BASE, [plain, smooth], objective="latency", budget=Budget(max_drop=0.01)) is plain
    assert "worse on latency" in smooth.reason


def test_nothing_qualifies_returns_none() -> None:
    r = result("x", p50=0.5, size=300, acc=0.5, drop=0.49, ok_budget=False)
    assert choose(BASE, [r], objective="latency", budget=Budget()) is None


def test_pareto_front() -> None:
    a = result("a", p50=0.5, size=300, acc=0.98, drop=0.01)
    dominated = result("d", p50=0.6, size=400, acc=0.97, drop=0.02)
    c = result("c", p50=0.3, size=500, acc=0.95, drop=0.04)
    front = pareto_front([BASE, a, dominated, c])
    assert {r.name for r in front} == {"original", "a", "c"}
    assert not dominated.pareto


def test_budget_validation() -> None:
    with pytest.raises(ConfigError, match="max-drop"):
        Budget(max_drop=-0.1)
    with pytest.raises(ConfigError, match="metric"):
        Budget(metric="f1")  # type: ignore[arg-type]
    assert Budget(max_drop=0.01).allows(0.99, 0.98)
    assert not Budget(max_drop=0.01).allows(0.99, 0.979)


def test_default_floor_follows_the_budget_where_agreement_cannot_see_near_ties() -> None:
    # agreement counts clear samples only: the floor carries the budget there (1 - max_drop / 2)
    tight = Budget(metric="agreement", max_drop=0.01)
    assert tight.floor == 0.995
    assert not tight.allows(1.0, 1.0, cosine=0.9935) and tight.allows(1.0, 1.0, cosine=0.9951)
    assert Budget(metric="agreement", max_drop=0.03).floor == 0.99  # never below the plain floor
    assert Budget(metric="agreement", max_drop=0.0).floor == 0.999  # capped: a float copy still qualifies
    for metric in ("accuracy", "cosine", "neighbours", "auto"):
        assert Budget(metric=metric, max_drop=0.01).floor == 0.99  # type: ignore[arg-type]
    # the user's own floor wins either way
    assert Budget(metric="agreement", max_drop=0.01, min_cosine=0.99).allows(1.0, 1.0, cosine=0.9935)
    assert Budget(metric="accuracy", max_drop=0.01, min_cosine=0.999).floor == 0.999
    with pytest.raises(ConfigError, match="min-cosine"):
        Budget(min_cosine=1.5)


def test_neighbours_budget_caps_the_expected_plain_agreement_at_twice_the_budget() -> None:
    # near-ties may flip (the tie-allowed agreement is the judged figure), but the plain agreement as
    # expected may fall at most 2 x max_drop: 98 % at 1 pt
    budget = Budget(metric="neighbours", max_drop=0.01)
    assert budget.nn_floor == 0.98 and Budget(metric="neighbours", max_drop=0.6).nn_floor == 0.0
    assert Budget(metric="cosine", max_drop=0.01).nn_floor is None  # other metrics: no such floor
    assert Budget(metric="cosine", max_drop=0.01).allows(1.0, 1.0, nn_expected=0.5)
    assert budget.allows(1.0, 1.0, cosine=0.9995, nn_expected=0.981)
    assert not budget.allows(1.0, 1.0, cosine=0.9995, nn_expected=0.975)
    # within the judge's noise (the 90 % interval over samples reaches the floor) is not shown below it
    assert budget.allows(1.0, 1.0, cosine=0.9995, nn_expected=0.975, nn_margin=0.006)
    assert not budget.allows(1.0, 1.0, cosine=0.9995, nn_expected=0.975, nn_margin=0.004)
    assert "expected plain NN agreement >= 98 %" in budget.describe()

    fast = nn_result("dq128", p50=0.42, cosine=0.9995, expected=0.962, margin=0.01)
    faithful = nn_result("rounded-dq32", p50=0.49, cosine=0.9998, expected=0.986, margin=0.01)
    assert choose(BASE, [fast, faithful], objective="latency", budget=budget) is faithful
    assert fast.reason == ("plain nearest-neighbour agreement, as expected, 96.20 % (90 % interval up to 97.20 %) "
                           "is below 98.00 % (near-ties may cost at most twice the budget)")
    fast.nn_expected_agreement = 0.975  # 97.5 +- 1.0 % reaches 98 %: not shown below the floor
    assert choose(BASE, [fast, faithful], objective="latency", budget=budget) is fast


def test_of_variants_as_fast_and_as_small_the_one_clear_of_the_nn_floor_wins() -> None:
    # rotation 0 of benchmarks/quantize_transformer.py: SmoothQuant 0.6 and 0.5, both re-rounded, groups of 128;
    # one size, under 1 % apart on p50, the same tie-allowed agreement and cosine losses within 10 %
    budget = Budget(metric="neighbours", max_drop=0.01)
    a06 = nn_result("smoothquant-0.6-rounded-dq128", p50=0.2967, cosine=0.999591, expected=0.9791, margin=0.012)
    a05 = nn_result("smoothquant-0.5-rounded-dq128", p50=0.2989, cosine=0.999559, expected=0.9806, margin=0.012)
    assert choose(BASE, [a06, a05], objective="latency", budget=budget) is a05
    assert a06.reason == ("as good on latency (within 5%) and on accuracy within the judge's noise (0.00 pt on ? "
                          "samples) but only within its 90 % interval of the 98 % floor on plain NN agreement "
                          "(expected 97.91 % vs 98.06 %), unlike the chosen one")
    # when none clears the floor outright, the interval still lets the faster one through (no FP32 fallback)
    a05.nn_expected_agreement = 0.9795
    assert choose(BASE, [a06, a05], objective="latency", budget=budget) is a06
    # nor does it reach beyond the tie: a clearly faster variant within the interval beats a slower clear one
    a05.nn_expected_agreement, a05.latency_ms, a05.speedup = 0.9849, {"p50": 0.37, "p99": 0.37}, 1 / 0.37
    assert choose(BASE, [a06, a05], objective="latency", budget=budget) is a06
    # other budgets have no NN floor: the faster of the faithful-equal pair wins as before
    a05.latency_ms, a05.speedup = {"p50": 0.2989, "p99": 0.2989}, 1 / 0.2989
    assert choose(BASE, [a06, a05], objective="latency", budget=Budget(metric="cosine", max_drop=0.01)) is a06


def test_auto_resolves_to_the_agreement_floor_without_labels() -> None:
    import numpy as np

    scores = np.eye(10, dtype=np.float32)[np.arange(20) % 10] * 5.0
    labels = np.arange(20) % 10
    assert Budget(max_drop=0.01).for_outputs(scores, None).floor == 0.995
    assert Budget(max_drop=0.01).for_outputs(scores, labels).floor == 0.99
    embeddings = np.random.default_rng(0).normal(size=(20, 3, 8)).astype(np.float32)
    assert Budget(max_drop=0.01).for_outputs(embeddings, None).floor == 0.99


@register_config
@dataclass(frozen=True)
class _ToyConfig:
    level: int = 1
    names: tuple[str, ...] = ()


def test_recipe_roundtrips_through_json_and_key_ignores_name() -> None:
    import json

    r = Recipe("toy", (_ToyConfig(level=3, names=("a", "b")),), runtime="onnxruntime", needs=("calibration",))
    again = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    assert Recipe("other-name", r.steps, needs=r.needs).key() == r.key()
    assert Recipe("toy", (_ToyConfig(level=4),)).key() != r.key()


def test_unknown_config_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown transform config 'os.system'"):
        config_from_dict({"type": "os.system", "fields": {}})
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"type": "_ToyConfig", "fields": {"bogus": 1}})
    assert config_to_dict(_ToyConfig(level=2))["fields"] == {"level": 2, "names": []}
