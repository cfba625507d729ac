"""Top-k accuracy of ranked candidates against the truth, with its chance level and a binomial p-value.

This scores what a live decoder publishes per trial: the ids of the retrieval pool's closest pictures, best first
(``rtdecode demo``; a display's saved ``trials.jsonl``). Chance for one trial is ``k / pool_size`` when its true
picture is in the pool; the p-value is the probability of at least the hits seen among ``n_scored`` independent
trials by chance.
"""

import dataclasses
from collections.abc import Hashable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class TopK:
    """Hits at rank 1 and within the first ``k`` of ``n_scored`` trials ranked among ``pool_size`` candidates."""

    n_scored: int
    n_top1: int
    n_topk: int
    k: int
    pool_size: int

    def chance(self, k: int) -> float:
        return min(1.0, k / max(1, self.pool_size))

    def p_value(self, n_hits: int, k: int) -> float:
        """P(at least ``n_hits`` hits in ``n_scored`` trials) when each hits with the chance of top-``k``."""
        return binomial_tail(n_hits, self.n_scored, self.chance(k))


def binomial_tail(n_hits: int, n: int, p: float) -> float:
    """P(X >= n_hits) for X ~ Binomial(n, p)."""
    from scipy.stats import binom

    return float(binom.sf(n_hits - 1, n, p))


def top_k(ranked: Mapping[Hashable, Sequence[str]], truth: Mapping[Hashable, str], pool_size: int, k: int = 5) -> TopK:
    """Score every trial that has a ranking and a known truth: ``ranked[trial]`` are candidate ids, best first."""
    scored = {trial: ids for trial, ids in ranked.items() if ids and trial in truth}
    n_top1 = sum(ids[0] == truth[trial] for trial, ids in scored.items())
    n_topk = sum(truth[trial] in ids[:k] for trial, ids in scored.items())
    return TopK(len(scored), n_top1, n_topk, k, pool_size)
