"""Bootstrap intervals, win rates and tied ranks on cases whose answer is known."""

import numpy as np
import pytest

from dgm_eit.errors import InputError
from dgm_eit.reconstruct import pool_members
from dgm_eit.stats import (Interval, mean_interval, order_agreement, paired_interval, rank_agreement, ranks,
                           relative_change, spread_verdict, std_interval, win_rate)


def _reference(n=200, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, size=n)


def test_a_method_exactly_ten_percent_better_on_every_image_has_that_interval():
    gn = _reference()
    iv = relative_change(0.9 * gn, gn, resamples=500, seed=1)
    assert iv.change == pytest.approx(-10.0) and iv.low == pytest.approx(-10.0) and iv.high == pytest.approx(-10.0)
    assert iv.verdict == "better" and win_rate(0.9 * gn, gn) == 1.0


def test_better_on_half_and_worse_on_half_is_tied_with_the_reference():
    gn = np.ones(200)
    method = np.where(np.arange(200) % 2 == 0, 0.8, 1.2)
    iv = relative_change(method, gn, resamples=2000, seed=3)
    assert iv.change == pytest.approx(0.0, abs=1e-12)
    assert iv.low < 0 < iv.high and iv.verdict == "tied"
    # 200 images of +-20%: the mean's standard error is 20% / sqrt(200) = 1.4%, so the 95% interval is about +-2.8%
    assert 2.0 < iv.high < 3.6 and -3.6 < iv.low < -2.0
    assert win_rate(method, gn) == 0.5


def test_the_interval_is_fixed_by_its_seed_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    gn = rng.uniform(0.5, 2.0, size=400)
    method = gn * rng.uniform(0.6, 1.2, size=400)
    a = relative_change(method, gn, resamples=1000, seed=7)
    assert a == relative_change(method, gn, resamples=1000, seed=7)
    few = relative_change(method[:25], gn[:25], resamples=1000, seed=7)
    assert few.high - few.low > 2 * (a.high - a.low)


def test_seeds_that_disagree_widen_the_interval_that_images_alone_would_give():
    gn = _reference(n=300)
    noise = np.random.default_rng(2).normal(0, 0.05, size=300)
    # three training seeds: -45%, -33%, -48% on average, as the CNF's at T1 2a 40 dB
    seeds = np.stack([gn * (1 + f + noise) for f in (-0.45, -0.33, -0.48)])
    one = relative_change(seeds[:1], gn, resamples=2000, seed=0)
    three = relative_change(seeds, gn, resamples=2000, seed=0)
    assert three.change == pytest.approx(100 * (seeds.mean() / gn.mean() - 1))
    assert (three.high - three.low) > 4 * (one.high - one.low)
    assert three.low < -45 and three.high > -36


def test_ranks_tie_overlapping_intervals_only():
    intervals = {"GN": Interval(0.0, 0.0, 0.0), "A": Interval(-40, -45, -35), "B": Interval(-38, -42, -30),
                 "C": Interval(-10, -20, 2)}
    got = ranks(intervals)
    assert got["A"] == (1, ("B",)) and got["B"] == (1, ("A",))
    assert got["C"] == (3, ("GN",)) and got["GN"] == (3, ("C",))


def test_bad_errors_are_refused():
    with pytest.raises(InputError, match="seeds, images"):
        relative_change(np.ones((2, 3)), np.ones(4))
    with pytest.raises(InputError, match="NaN"):
        relative_change(np.array([1.0, np.nan]), np.ones(2))


def test_pooling_the_members_equals_the_statistics_of_all_their_samples():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 16, 2, 4, 4))          # 3 members x 16 samples of 2 images
    members = [{"recon": s.mean(axis=0), "recon_std": s.std(axis=0, ddof=1), "n_samples": 16, "nfe": 16,
                "seconds_per_image": 0.5} for s in samples]
    pooled = pool_members(members)
    everything = samples.reshape(48, 2, 4, 4)
    np.testing.assert_allclose(pooled["recon"], everything.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled["recon_std"], everything.std(axis=0, ddof=1), rtol=1e-5, atol=1e-6)
    assert (pooled["n_samples"], pooled["nfe"], pooled["seconds_per_image"]) == (48, 48, 1.5)
    # deterministic members (one image each): the spread over the members
    images = rng.normal(size=(4, 2, 4, 4))
    pooled = pool_members([{"recon": x} for x in images])
    np.testing.assert_allclose(pooled["recon_std"], images.std(axis=0, ddof=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="at least 2"):
        pool_members(members[:1])
    with pytest.raises(InputError, match="different sample counts"):
        pool_members([members[0], {**members[1], "n_samples": 8}])


def test_rank_agreement_of_validation_and_real_scores():
    val = {"linear": 0.637, "gn": 0.723, "cvae": 0.793, "cnf": 0.768, "csd": 0.727}
    real = {"linear": 20.35, "gn": 17.74, "cvae": 21.64, "cnf": 23.23, "csd": 20.41}
    # ranks 5 4 1 2 3 against 4 5 2 1 3: two swapped pairs, sum of squared rank differences 4
    assert rank_agreement(val, real) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert rank_agreement(val, val) == pytest.approx(1.0)
    assert rank_agreement(val, {k: -v for k, v in val.items()}) == pytest.approx(-1.0)
    with pytest.raises(InputError, match="same methods"):
        rank_agreement(val, {"gn": 1.0, "cvae": 2.0, "cnf": 3.0})
    with pytest.raises(InputError, match="same value"):
        rank_agreement(val, dict.fromkeys(val, 1.0))


def test_the_std_interval_of_three_seeds_spans_half_to_six_times_the_estimate_and_covers_95_percent():
    std, low, high = std_interval([-46.7, -48.5, -54.7])
    assert std == pytest.approx(np.std([-46.7, -48.5, -54.7], ddof=1))
    assert low / std == pytest.approx(0.5206, abs=1e-3) and high / std == pytest.approx(6.285, abs=1e-2)
    # ten seeds: about 0.69 to 1.83 times
    _, low10, high10 = std_interval(np.arange(10.0))
    assert low10 / np.std(np.arange(10.0), ddof=1) == pytest.approx(0.688, abs=2e-3)
    assert high10 / np.std(np.arange(10.0), ddof=1) == pytest.approx(1.826, abs=2e-3)
    # coverage on normal draws of a known std
    rng = np.random.default_rng(0)
    covered = [low <= 2.0 <= high for _, low, high in (std_interval(rng.normal(5.0, 2.0, 3)) for _ in range(4000))]
    assert 0.935 < np.mean(covered) < 0.965
    with pytest.raises(InputError, match="at least 2 finite"):
        std_interval([1.0])
    with pytest.raises(InputError, match="at least 2 finite"):
        std_interval([1.0, np.nan, 2.0])


def test_a_spread_goal_is_met_or_missed_only_when_the_whole_interval_says_so():
    assert spread_verdict(1.0, 2.9, 3.0) == "met"
    assert spread_verdict(3.1, 9.0, 3.0) == "missed"
    assert spread_verdict(1.7, 20.8, 3.0) == "undecided"


def test_paired_interval_resamples_images_and_seed_pairs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.1, size=(2, 40)), rng.normal(0.7, 0.1, size=40)
    # one row each: the bootstrap of the per-image difference
    assert paired_interval(a[0], b, resamples=300, seed=1) == mean_interval(a[0] - b, resamples=300, seed=1)
    # two seeds against one: a row per seed pair, the mean is the mean over them
    iv = paired_interval(a, b, resamples=300, seed=1)
    assert iv == mean_interval(a - b[None], resamples=300, seed=1)
    assert iv.change == pytest.approx((a.mean(axis=0) - b).mean()) and iv.low < iv.change < iv.high
    # pairing: a shared per-image offset leaves the difference, and so the interval, unchanged
    offset = rng.normal(0, 5, size=40)
    shifted = paired_interval(a + offset, b + offset, resamples=300, seed=1)
    np.testing.assert_allclose([shifted.change, shifted.low, shifted.high], [iv.change, iv.low, iv.high], atol=1e-12)
    with pytest.raises(InputError, match="same images"):
        paired_interval(a, b[:39])


def test_order_agreement_splits_the_pairs():
    pairs = {("gn", "cvae"): Interval(0.05, 0.01, 0.09),      # validation: GN ahead
             ("gn", "cnf"): Interval(-0.04, -0.07, -0.01),     # validation: the CNF ahead
             ("cvae", "cnf"): Interval(0.01, -0.02, 0.04)}     # validation cannot tell
    real = {"gn": 21.0, "cvae": 20.0, "cnf": 20.0}
    split = order_agreement(pairs, real)
    assert split == {"agree": [("gn", "cvae")], "disagree": [("gn", "cnf")], "tied": [("cvae", "cnf")]}
    # a tie on the real targets is not agreement
    assert order_agreement(pairs, dict.fromkeys(real, 20.0))["agree"] == []
