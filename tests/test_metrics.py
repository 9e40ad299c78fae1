import math

import numpy as np
import pytest

from fvq_plugin.metrics import correlation_report, krcc, logistic_fit, plcc, rmse, srcc

# Textbook pair: rank differences (-1, 1, -1, 1, 0) give rho = 1 - 6*4/(5*24) = 0.8;
# 2 discordant of 10 pairs give tau = (8 - 2) / 10 = 0.6.
X = [1, 2, 3, 4, 5]
Y = [2, 1, 4, 3, 5]


def test_known_values():
    assert srcc(X, Y) == pytest.approx(0.8)
    assert krcc(X, Y) == pytest.approx(0.6)
    assert plcc(X, Y, fit=False) == pytest.approx(0.8)
    assert rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))


def test_perfect_and_reversed_order():
    mos = np.linspace(10, 90, 20)
    assert srcc(mos / 10, mos) == pytest.approx(1.0)
    assert krcc(-mos, mos) == pytest.approx(-1.0)


def test_logistic_fit_linearises_a_sigmoid_prediction():
    mos = np.linspace(5, 95, 40)
    pred = 3 + 0.5 * np.log(mos / (100 - mos))  # MOS = 100 / (1 + exp(-(pred - 3) / 0.5)): far from linear
    assert plcc(pred, mos, fit=False) < 0.99
    assert plcc(pred, mos) == pytest.approx(1.0, abs=1e-6)
    assert rmse(pred, mos, fit=True) < 1.0
    assert np.allclose(logistic_fit(pred, mos), mos, atol=1.0)


@pytest.mark.parametrize("pred, mos", [([1, 2], [3, 4]), ([5, 5, 5, 5], [1, 2, 3, 4]), ([1, 2, 3], [7, 7, 7])])
@pytest.mark.parametrize("metric", [srcc, krcc, plcc])
def test_undefined_correlations_warn_and_give_nan(metric, pred, mos):
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(metric(pred, mos))


def test_rmse_after_fit_is_undefined_for_constant_predictions():
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(rmse([5, 5, 5, 5], [1, 2, 3, 4], fit=True))
    assert rmse([5, 5, 5, 5], [1, 2, 3, 4]) == pytest.approx(math.sqrt(np.mean([16, 9, 4, 1])))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        plcc([1, float("nan"), 3], [1, 2, 3])


def test_report_has_the_four_numbers_and_count():
    report = correlation_report(X, Y)
    assert set(report) == {"srcc", "plcc", "krcc", "rmse", "n"}
    assert report["n"] == 5 and report["srcc"] == pytest.approx(0.8)


def test_logistic_fit_needs_more_samples_than_parameters():
    with pytest.warns(RuntimeWarning, match="too few for"):
        assert plcc([1, 2, 4], [10, 30, 35]) == pytest.approx(plcc([1, 2, 4], [10, 30, 35], fit=False))
