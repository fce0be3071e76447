"""The best constant mixture of the members: the baseline a per-token router must beat."""

from __future__ import annotations

import math

import pytest
import torch

from salm.evaluation.analysis import constant_mixture, fit_constant_mixture, teacher_forced_metrics


def _nll(lp: torch.Tensor, w: torch.Tensor) -> float:
    return -float(torch.logsumexp(lp.double() + w.double().clamp_min(1e-300).log(), dim=-1).mean())


def test_em_finds_the_grid_optimum():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(400, 2, 5) * 2, dim=-1)[..., 0]  # [T, 2] log p of a gold token
    w = fit_constant_mixture(lp)
    grid = torch.linspace(0, 1, 10001)
    losses = torch.tensor([_nll(lp, torch.tensor([a, 1 - a])) for a in grid.tolist()])
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(w[0]) == pytest.approx(float(grid[losses.argmin()]), abs=2e-3)
    assert _nll(lp, w) <= float(losses.min()) + 1e-7


def test_constant_mixture_sits_between_best_member_and_oracle_and_cross_fitting_is_honest():
    # Sequence 0 (even) is member a's, sequence 1 (odd) is member b's: fitted on the other fold, weights are wrong.
    a = torch.tensor([[math.log(0.9), math.log(0.1)]] * 50)
    b = torch.tensor([[math.log(0.1), math.log(0.9)]] * 50)
    lp, rows = torch.cat([a, b]), torch.tensor([0] * 50 + [1] * 50)
    member = (-lp.mean(0)).tolist()
    oracle = -float(lp.max(-1).values.mean())
    res = constant_mixture(lp, rows, ["a", "b"], min(member), oracle)
    assert res["weights"] == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-4)
    assert res["nll_in_hindsight"] == pytest.approx(-math.log(0.5), abs=1e-6)
    assert oracle < res["nll_in_hindsight"] <= min(member) + 1e-9
    assert res["nll"] > res["nll_in_hindsight"]  # each fold was fitted on the other member's sequence
    assert res["captured_share"] == pytest.approx((min(member) - res["nll"]) / (min(member) - oracle))
    given = constant_mixture(lp, rows, ["a", "b"], min(member), oracle, fit_logprobs=a)
    assert given["nll"] == pytest.approx(_nll(lp, fit_constant_mixture(a)), abs=1e-6) and "validation" in given["fit"]


def test_teacher_forced_metrics_report_the_constant_mixture(tiny_ensemble):
    from salm.evaluation.analysis import score_continuations

    pairs = [("Question: what is two plus three?\nAnswer:\n", "Reasoning: 2 + 3 = 5."), ("def add(a, b):", " return")]
    fit = [("The patient presented with", " fever and cough"), ("The quick brown", " fox jumps")]
    tf = teacher_forced_metrics(tiny_ensemble, pairs, batch_size=2, fit_items=fit)
    const = tf["constant_mixture"]
    test_lp = score_continuations(tiny_ensemble, pairs).token_logprobs
    fit_lp = score_continuations(tiny_ensemble, fit).token_logprobs
    assert test_lp.shape == (tf["tokens"], len(tiny_ensemble.model_ids))
    assert const["nll"] == pytest.approx(_nll(test_lp, fit_constant_mixture(fit_lp)), abs=1e-5)
    assert tf["oracle_nll"] - 1e-6 <= const["nll_in_hindsight"] <= tf["best_member_nll"] + 1e-6
    assert set(const["weights"]) == set(tiny_ensemble.model_ids)
