"""Budgeted selection: mmSSR's round robin against a plain reference, and the baselines."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from curate.selection import Bins, mmssr_select, random_select, style_bins, tie_order, top_k

STYLES = ["multi-choice", "yes/no", "short description", "detailed description", "comparison"]


def reference(
    scores: dict[str, list[float]],
    bins: list[list[str]],
    n_select: int,
    thr: float,
    tie: Sequence[int],
) -> list[int]:
    """The algorithm of ``llava/select/mmssr.py`` written out with lists and dicts:
    stable descending sorts (ties by ``tie``), bins by (size, key)."""
    caps = list(scores)
    remaining = set(range(len(bins)))
    chosen: list[int] = []
    while len(chosen) < n_select and caps:
        budget = max((n_select - len(chosen)) // len(caps), 1)
        drop = []
        for cap in caps:
            budget = min(budget, n_select - len(chosen))
            s = scores[cap]
            cands = [i for i in remaining if not math.isnan(s[i]) and s[i] > thr]
            cands.sort(key=lambda i: (-s[i], tie[i]))
            # melt: every first style in score order, then every second style, ...
            groups: dict[str, list[int]] = {}
            width = max((len(bins[i]) for i in cands), default=0)
            for position in range(width):
                for i in cands:
                    if position < len(bins[i]):
                        groups.setdefault(bins[i][position], []).append(i)
            picked: list[int] = []
            if groups:
                quota = max(budget // len(groups), 1)
                debt = 0
                for key in sorted(groups, key=lambda k: (len(groups[k]), k)):
                    if len(picked) >= budget:
                        break
                    free = [i for i in groups[key] if i not in picked]
                    take = min(quota + debt, len(free))
                    debt = max(quota + debt - len(free), 0)
                    picked.extend(free[:take])
            if not picked:
                drop.append(cap)
            remaining -= set(picked)
            chosen.extend(picked)
            if len(chosen) >= n_select:
                break
        caps = [c for c in caps if c not in drop]
    return chosen


def synthetic(
    n: int, n_caps: int, n_sources: int, seed: int
) -> tuple[dict[str, list[float]], list[list[str]]]:
    rng = random.Random(seed)
    scores: dict[str, list[float]] = {}
    for c in range(n_caps):
        col = [float(rng.randint(0, 5)) for _ in range(n)]
        for i in rng.sample(range(n), n // 20):
            col[i] = float("nan")  # unparseable answers
        scores[f"cap{c}"] = col
    styles = []
    for _ in range(n):
        k = rng.choice([0, 1, 1, 1, 2, 2, 3])  # some samples have no style at all
        row = rng.sample(STYLES, k)
        if k and rng.random() < 0.05:
            row.append(row[0])  # a repeated style is one bin
        styles.append(row)
    sources = [f"src{rng.randint(0, n_sources - 1)}" for _ in range(n)]
    return scores, style_bins(styles, sources)


@pytest.mark.parametrize(
    ("n", "n_caps", "n_sources", "ratio", "thr", "seed"),
    [
        (3000, 14, 6, 0.3, 0, 1),
        (3000, 14, 6, 0.05, 0, 2),
        (2000, 3, 1, 0.1, 2, 3),
        (2500, 5, 40, 0.3, 3, 4),  # more bins than the per-capability budget
        (1500, 2, 3, 0.9, 4, 5),  # capabilities run out: the budget is not met
        (4000, 1, 10, 0.5, 0, 6),
    ],
)
def test_mmssr_matches_reference(
    n: int, n_caps: int, n_sources: int, ratio: float, thr: float, seed: int
) -> None:
    scores, bins = synthetic(n, n_caps, n_sources, seed)
    n_select = int(n * ratio)
    tie = list(range(n))
    want = reference(scores, [list(dict.fromkeys(b)) for b in bins], n_select, thr, tie)
    arrays = {c: np.array(v) for c, v in scores.items()}
    got = mmssr_select(arrays, Bins.of(bins), n_select, thr)
    assert got.chosen == want
    assert len(got.chosen) == len(set(got.chosen))
    assert len(got.chosen) <= n_select
    for i in got.chosen:
        assert scores[got.capability[i]][i] > thr
        assert got.bin[i] in bins[i]


def test_seeded_ties_match_reference_and_differ_from_pool_order() -> None:
    scores, bins = synthetic(2000, 4, 5, 11)
    ids = [f"id{i}" for i in range(2000)]
    tie = tie_order(ids, seed=7)
    want = reference(scores, [list(dict.fromkeys(b)) for b in bins], 600, 0, tie.tolist())
    arrays = {c: np.array(v) for c, v in scores.items()}
    got = mmssr_select(arrays, Bins.of(bins), 600, 0, tie_rank=tie)
    assert got.chosen == want
    pool = mmssr_select(arrays, Bins.of(bins), 600, 0)
    assert set(pool.chosen) != set(got.chosen)


def test_unmet_budget_is_reported() -> None:
    scores = {"a": np.array([5.0, 1.0, np.nan, 4.0]), "b": np.array([0.0, 0.0, 0.0, 2.0])}
    bins = Bins.of([["x+s"], ["x+s"], ["y+s"], []])
    got = mmssr_select(scores, bins, 4, threshold=1)
    # only sample 0 is above the threshold with a style; sample 3 has none
    assert got.chosen == [0]
    assert got.exhausted == ["b", "a"]


def test_small_bins_first_with_carried_debt() -> None:
    # one capability, budget 6, three bins of sizes 1, 2 and 10: quota 2 each;
    # the 1-bin leaves a debt of 1, so the 2-bin gives 2 and the big bin 3
    bins = [["a+s"]] + [["b+s"]] * 2 + [["c+s"]] * 10
    score = np.array([5.0] + [4.0, 3.0] + [float(10 - i) / 2 for i in range(10)])
    got = mmssr_select({"cap": np.minimum(score, 5)}, Bins.of(bins), 6)
    assert got.chosen == [0, 1, 2, 3, 4, 5]
    assert [got.bin[i] for i in got.chosen] == ["a+s", "b+s", "b+s", "c+s", "c+s", "c+s"]


def test_melt_order_puts_first_styles_before_second_styles() -> None:
    # sample 0 scores highest but has bin "z" only as its second style: in bin z
    # the samples with z first come before it (pandas melt order)
    bins = [["y+s", "z+s"], ["z+s"], ["z+s"], ["w+s"]]
    score = np.array([5.0, 3.0, 2.0, 1.0])
    got = mmssr_select({"cap": score}, Bins.of(bins), 2)
    # bins by size: w(1), y(1), z(3); quota max(2 // 3, 1) = 1: w gives 3, y gives 0
    assert got.chosen == [3, 0]
    got = mmssr_select({"cap": score}, Bins.of([["z+s", "y+s"], ["z+s"], ["z+s"], []]), 1)
    assert got.chosen == [0]


def test_random_select_is_seeded_and_order_free() -> None:
    ids = [f"doc-{i}" for i in range(1000)]
    a = random_select(ids, 300, seed=1)
    assert len(a) == 300
    assert a == random_select(ids, 300, seed=1)
    assert a != random_select(ids, 300, seed=2)
    shuffled = list(reversed(ids))
    b = random_select(shuffled, 300, seed=1)
    assert sorted(shuffled[i] for i in b) == sorted(ids[i] for i in a)


def test_top_k() -> None:
    score = np.array([0.1, np.nan, 0.9, 0.5, 0.9, 0.2])
    assert top_k(score, 2) == [2, 4]
    assert top_k(score, 3) == [2, 3, 4]
    assert top_k(score, 2, descending=False) == [0, 5]
    assert top_k(score, 10) == [0, 2, 3, 4, 5]  # NaN never chosen
