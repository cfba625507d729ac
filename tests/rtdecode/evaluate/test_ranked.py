"""Top-k scoring of ranked candidates (what the demo's summary and a display's saved trials are scored with)."""

import numpy as np
import pytest
from scipy.stats import binom

from rtdecode.evaluate.ranked import binomial_tail, top_k


def test_the_binomial_tail_equals_scipys():
    for n_hits, n, p in [(0, 10, 0.1), (3, 31, 0.02), (15, 50, 0.1), (60, 60, 0.5), (7, 5, 0.3)]:
        assert binomial_tail(n_hits, n, p) == pytest.approx(binom.sf(n_hits - 1, n, p), abs=1e-12)


def test_hits_are_counted_at_rank_one_and_within_k():
    ranked = {"a": ["x", "y", "z"], "b": ["y", "x"], "c": ["q", "r", "s", "t", "u", "x"], "d": [], "e": ["x"]}
    truth = {"a": "x", "b": "x", "c": "x", "d": "x"}  # "d" has no ranking, "e" no truth: neither is scored
    result = top_k(ranked, truth, pool_size=20, k=5)
    assert (result.n_scored, result.n_top1, result.n_topk) == (3, 1, 2)
    assert result.chance(1) == 0.05 and result.chance(5) == 0.25


def test_random_rankings_score_chance():
    rng = np.random.default_rng(0)
    pool = [f"img-{index}" for index in range(50)]
    ranked = {trial: list(rng.permutation(pool)) for trial in range(4000)}
    truth = {trial: pool[trial % 50] for trial in range(4000)}
    result = top_k(ranked, truth, pool_size=50, k=5)
    # sd of a rate over 4000 trials: 0.0022 at 1/50, 0.0047 at 5/50; 4 sd either side
    assert abs(result.n_top1 / 4000 - 0.02) < 0.009 and abs(result.n_topk / 4000 - 0.10) < 0.019
    assert result.p_value(result.n_topk, 5) > 1e-3
