"""metrics.py: the correlations against hand-worked numbers and scipy, the logistic fit against known parameters, NaN
(never a crash) for constant predictions, coverage and lower-is-better, WAVG weighted by image count."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

import metrics


def test_rank_and_linear_correlations_hand_worked_and_scipy():
    pred, mos = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    # One swapped neighbour pair: d = (0, 1, -1, 0) -> rho = 1 - 6 * 2 / (4 * 15); 5 concordant, 1 discordant of 6.
    assert metrics.srcc(pred, mos) == pytest.approx(0.8)
    assert metrics.krcc(pred, mos) == pytest.approx(4 / 6)
    dp, dm = pred - pred.mean(), mos - mos.mean()
    assert metrics.plcc(pred, mos) == pytest.approx((dp @ dm) / math.sqrt((dp @ dp) * (dm @ dm)))
    rng = np.random.default_rng(0)
    pred, mos = rng.normal(size=40), rng.normal(size=40)
    pred[:5] = pred[5:10]  # ties
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic)
    assert metrics.plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic)


def test_logistic_fit_recovers_known_parameters_from_noiseless_data():
    pred = np.linspace(-1.0, 4.0, 60)
    truth = (4.8, 1.2, 1.7, 0.6)
    mos = truth[1] + (truth[0] - truth[1]) / (1 + np.exp(-(pred - truth[2]) / truth[3]))
    params = metrics.fit_logistic(pred, mos)
    assert params[:3] == pytest.approx(truth[:3], abs=1e-4)
    assert abs(params[3]) == pytest.approx(truth[3], abs=1e-4)
    assert metrics.plcc_logistic(pred, mos) == pytest.approx(1.0, abs=1e-9)
    assert metrics.rmse_logistic(pred, mos) == pytest.approx(0.0, abs=1e-5)


def test_plcc_logistic_beats_raw_plcc_on_a_monotone_curved_relation():
    pred = np.linspace(1, 5, 30)
    mos = 1 + 4 / (1 + np.exp(-3 * (pred - 3)))  # monotone, strongly S-shaped: Pearson < 1, SRCC = 1
    assert metrics.srcc(pred, mos) == pytest.approx(1.0)
    assert metrics.plcc(pred, mos) < 0.97
    assert metrics.plcc_logistic(pred, mos) >= metrics.plcc(pred, mos)
    assert metrics.plcc_logistic(pred, mos) == pytest.approx(1.0, abs=1e-6)
    # rmse_logistic is in MOS units: the residual of the best fit, below the raw spread of the MOS
    assert metrics.rmse_logistic(pred, mos) < 1e-3 < mos.std()


def test_constant_predictions_give_nan_and_a_warning_never_a_crash():
    pred, mos = np.full(10, 3.0), np.linspace(1, 5, 10)
    with pytest.warns(UserWarning, match="logistic fit"):
        assert math.isnan(metrics.plcc_logistic(pred, mos))
    with pytest.warns(UserWarning, match="logistic fit"):
        assert math.isnan(metrics.rmse_logistic(pred, mos))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(metrics.srcc(pred, mos)) and math.isnan(metrics.plcc(pred, mos))


def test_benchmark_metrics_coverage_nan_below_three_and_lower_better():
    records = [{"image": f"{i}.png", "mos": m, "score": s} for i, (m, s) in enumerate([(1, 1.5), (2, 2.5), (3, 2.0),
                                                                                       (4, 4.5), (5, None)])]
    records.append({"image": "gone.png", "mos": 2.0, "score": None, "error": "missing file"})
    up = metrics.benchmark_metrics("b", records, lower_better=False)
    assert (up["n"], up["n_valid"], up["missing"], up["missing_images"]) == (6, 4, 1, ["gone.png"])
    assert up["coverage"] == pytest.approx(4 / 6)
    assert up["srcc"] == pytest.approx(stats.spearmanr([1.5, 2.5, 2.0, 4.5], [1, 2, 3, 4]).statistic)
    down = metrics.benchmark_metrics("b", records, lower_better=True)
    for key in ("srcc", "krcc", "plcc"):
        assert down[key] == pytest.approx(-up[key])
    with pytest.warns(UserWarning, match="only 2 valid"):
        few = metrics.benchmark_metrics("b", records[:2], lower_better=False)
    assert all(math.isnan(few[k]) for k in metrics.METRICS)


def test_wavg_is_weighted_by_image_count_and_mean_is_plain():
    benchmarks = {"a": {"n": 100, "coverage": 1.0, **{k: 0.9 for k in metrics.METRICS}},
                  "b": {"n": 300, "coverage": 0.5, **{k: 0.5 for k in metrics.METRICS}}}
    wavg, mean = metrics.aggregate(benchmarks)
    assert wavg["srcc"] == pytest.approx((100 * 0.9 + 300 * 0.5) / 400)
    assert mean["srcc"] == pytest.approx(0.7)
    assert wavg["coverage"] == pytest.approx(250 / 400)
