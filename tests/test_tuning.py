"""The tuning protocol (`trsae.tuning`): its rule on hand-made trials, the L1 search on a closed-form L0 curve, and
one small tuning on the tiny store, read back from the val split independently."""

import math

import pytest
import yaml

from trsae import runner, tuning
from trsae.config import TrainConfig
from trsae.saes import SAEConfig


def test_rule_takes_the_lowest_fvu_among_runs_at_the_target_with_few_dead_latents():
    trials = [{"lr": 1, "fvu": 0.10, "l0": 40.0, "dead_frac": 0.0}, {"lr": 2, "fvu": 0.20, "l0": 33.0, "dead_frac": 0.0},
              {"lr": 3, "fvu": 0.30, "l0": 31.0, "dead_frac": 0.0}, {"lr": 4, "fvu": 0.05, "l0": 32.0, "dead_frac": 0.5}]
    assert tuning.choose_lr(trials, 32) == 2  # lr 1: lowest FVU of the living, L0 25 % off; lr 4: half dead
    assert tuning.choose_lr(trials[:3], None) == 1  # no target: the lowest FVU
    far = [{"lr": 1, "fvu": 0.1, "l0": 50.0, "dead_frac": 0.0}, {"lr": 2, "fvu": 0.2, "l0": 45.0, "dead_frac": 0.0}]
    assert tuning.choose_lr(far, 32) == 2  # none at the target: the nearest L0


def test_without_a_qualifying_run_the_rule_passes_over_broken_and_half_dead_ones():
    """JumpReLU's grid on gemma-3-270m: no rate within 10 % of L0 32; the nearest L0 belongs to a run that is a
    quarter dead and reconstructs worse than the mean, which must not be taken over a healthy run 17 % off."""
    trials = [{"lr": 1, "fvu": 0.18, "l0": 37.4, "dead_frac": 0.001}, {"lr": 2, "fvu": 0.21, "l0": 26.3, "dead_frac": 0.001},
              {"lr": 3, "fvu": 1.98, "l0": 29.8, "dead_frac": 0.26}]
    assert tuning.choose_lr(trials, 32) == 1
    broken = [{"lr": 1, "fvu": 1.5, "l0": 40.0, "dead_frac": 0.3}, {"lr": 2, "fvu": 2.0, "l0": 31.0, "dead_frac": 0.5}]
    assert tuning.choose_lr(broken, 32) == 2  # nothing usable: the nearest L0 again


class _PenaltyL0(tuning.Tuner):
    """A tuner whose runs are a closed form: JumpReLU's L0 = k (1 + 0.6 / weight multiple), FVU rising with it."""

    def __init__(self, k):
        self.k, self.calls = k, []

    def score(self, cfg, lr):
        m = cfg.sparsity.l0_coeff / self.base
        self.calls.append(m)
        return {"lr": lr, "fvu": 0.1 + 0.01 * m, "l0": self.k * (1 + 0.6 / m), "dead_frac": 0.0}


def test_penalty_search_raises_jumprelus_weight_until_its_l0_is_at_k():
    cfg = SAEConfig.build(16, 64, "jumprelu", k=8)
    tuner = _PenaltyL0(8)
    tuner.base = cfg.sparsity.l0_coeff
    first = tuner.score(cfg, 1e-3) | {}
    tuner.calls.clear()
    chosen, trials = tuner.penalty_search(cfg, first)
    assert tuner.calls == [4.0, 16.0]  # x4 leaves L0 15 % high, x16 lands within 10 %
    assert [t["l0_coeff"] for t in trials] == [tuner.base * m for m in (1, 4, 16)]
    assert chosen.sparsity.l0_coeff == tuner.base * 16 and all(t["lr"] == 1e-3 for t in trials)
    tuner.calls.clear()
    at_k = first | {"l0": 8.5}
    assert tuner.penalty_search(cfg, at_k)[0].sparsity.l0_coeff == tuner.base and tuner.calls == []


@pytest.mark.parametrize("alpha, c", [(0.7, 3.0), (1.5, 0.02), (0.3, 40.0)])
def test_l1_search_finds_the_weight_of_a_power_law_l0(alpha, c):
    """L0 = c w^-alpha: the secant search in log-log lands within the tolerance in a few steps."""
    target = 32
    points = [(0.01, c * 0.01 ** -alpha)]
    for _ in range(tuning.L1_SEARCH_RUNS):
        w = tuning.next_l1(points, target)
        points.append((w, c * w ** -alpha))
        if tuning.at_target(points[-1][1], target):
            break
    assert tuning.at_target(points[-1][1], target), points
    assert points[-1][0] == pytest.approx((c / target) ** (1 / alpha), rel=tuning.L0_TOLERANCE / alpha + 1e-9)


def test_a_small_tuning_chooses_from_its_own_val_runs(tiny_store, tmp_path):
    d, k = tiny_store.d_model, 4
    specs = {"TopK": SAEConfig.build(d, 4 * d, "topk", k=k), "ReLU-L1": SAEConfig.build(d, 4 * d, "relu")}
    train_cfg = TrainConfig(tokens=1_500, batch_size=4, crop_len=16, lr=4e-4)
    tuner = tuning.Tuner(tiny_store, train_cfg, tmp_path, k)
    result = tuner.tune(specs, lrs=(1e-4, 1e-3))
    topk = result["trials"]["TopK"]
    assert [t["lr"] for t in topk] == [1e-4, 1e-3] and all(t["l0"] == pytest.approx(k) for t in topk)
    assert result["lrs"]["TopK"] == tuning.choose_lr(topk, k)
    # each trial is the val-split evaluation of the run cached under the tuning's own config, read back here
    cfg = runner.family_train(train_cfg, "TopK", result["lrs"])
    sae, run = runner.ensure_sae(specs["TopK"], cfg, tiny_store, tmp_path)
    val = runner.Evaluator(tiny_store, split="val", max_seqs=0, with_logits=False, density_tokens=1_500)({run: sae})[run]
    chosen = next(t for t in topk if t["lr"] == result["lrs"]["TopK"])
    assert chosen["fvu"] == pytest.approx(1 - val["reconstruction_quality"]["explained_variance"], rel=1e-12)
    # the L1 weight is searched at each rate; each rate's row is the run of its search nearest the target, and the
    # chosen weight is the chosen rate's
    l1 = result["l1_trials"]
    assert len({t["l1_coeff"] for t in l1}) > 1
    for t in result["trials"]["ReLU-L1"]:
        at_lr = [u for u in l1 if u["stage"] == f"at lr {t['lr']:g}"]
        nearest = min(at_lr, key=lambda u: abs(math.log(u["l0"] / k)))
        assert t == {key: v for key, v in nearest.items() if key != "stage"}
    relu = result["trials"]["ReLU-L1"]
    assert [t["lr"] for t in relu] == [1e-4, 1e-3] and result["lrs"]["ReLU-L1"] == tuning.choose_lr(relu, k)
    assert result["relu_l1_coeff"] == next(t for t in relu if t["lr"] == result["lrs"]["ReLU-L1"])["l1_coeff"]
    table = tuning.markdown(result, k, "tiny", train_cfg.tokens)
    assert "| TopK |" in table and "**" in table and f"{result['relu_l1_coeff']:.4g}" in table


def _result(families: dict[str, float], jump_weight: float | None = None, relu: bool = False) -> dict:
    """A tuning result as `Tuner.tune` returns it: per family a grid of two rates whose FVU is ``base + lr``."""
    trials = {n: [{"lr": lr, "fvu": base + lr, "l0": 32.0, "dead_frac": 0.01} for lr in (1e-3, 2e-3)]
              for n, base in families.items()}
    out = {"lrs": {n: 1e-3 for n in families}, "trials": trials, "l1_trials": []}
    if relu:
        out["l1_trials"] = [{"stage": "at lr 0.001", "lr": 1e-3, "l1_coeff": 0.003, "l0": 31.0, "fvu": 0.7}]
        out["relu_l1_coeff"] = 0.003
    if jump_weight is not None:
        out["penalty_trials"] = [{"stage": "at the base rate", "lr": 1e-3, "l0_coeff": jump_weight, "l0": 35.0,
                                  "dead_frac": 0.0, "fvu": 0.2}]
        out["jumprelu_l0_coeff"] = jump_weight
    return out


def test_tuning_one_family_alone_writes_what_tuning_all_would():
    """`merge_markdown` of an earlier table of every family and a table of JumpReLU alone equals the table of
    every family tuned at once with JumpReLU's new runs."""
    before = {"ReLU-L1": 0.7, "TopK": 0.06, "JumpReLU": 0.18, "TRSAE": 0.063}
    after = before | {"JumpReLU": 0.15}
    md = lambda r: tuning.markdown(r, 32, "cpu", 300_000)  # noqa: E731
    old = md(_result(before, jump_weight=0.006, relu=True))
    alone = md(_result({"JumpReLU": 0.15}, jump_weight=0.1))
    merged = tuning.merge_markdown(old, alone, ["JumpReLU"])
    assert merged == md(_result(after, jump_weight=0.1, relu=True))
    assert merged != old and "| 0.1 |" not in old
    other_grid = md({"lrs": {"JumpReLU": 1e-3}, "trials": {"JumpReLU": [{"lr": 1e-3, "fvu": 0.1, "l0": 32.0,
                                                                          "dead_frac": 0.0}]}})
    with pytest.raises(ValueError, match="learning-rate grids"):
        tuning.merge_markdown(old, other_grid, ["JumpReLU"])


def test_the_profiles_tuned_values_are_those_their_tuning_chose():
    """params/<profile>.yaml holds exactly what `python -m trsae tune` wrote to params/tuning/<profile>.yaml."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for chosen in sorted((root / "params" / "tuning").glob("*.yaml")):
        profile = yaml.safe_load((root / "params" / chosen.name).read_text())
        choice = yaml.safe_load(chosen.read_text())
        shared = profile["shared"]
        assert shared["lrs"] == choice["lrs"], chosen.name
        if "relu_l1_coeff" in choice:
            assert profile["01_baseline"]["relu_l1_coeff"] == choice["relu_l1_coeff"], chosen.name
        if "jumprelu_l0_coeff" in choice:
            assert shared["jumprelu_l0_coeff"] == choice["jumprelu_l0_coeff"], chosen.name
