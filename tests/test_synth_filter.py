"""The uncertainty filter and the labelling scores (baselines spec C9, C10)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.filtering import keep_indices
from bench.errors import BenchError
from bench.probe import image_uncertainty, js_uncertainty, majority_vote


def test_c9_identical_members_give_zero_js():
    probs = torch.softmax(torch.randn(1, 65536, 5), -1).repeat(10, 1, 1)
    assert float(js_uncertainty(probs).abs().max()) < 1e-6


def test_c9_two_confident_disagreeing_members_give_ln2():
    logits = torch.tensor([[[50.0, -50.0]], [[-50.0, 50.0]]])
    assert js_uncertainty(logits.softmax(-1)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_c9_image_score_is_mean_of_top_6553_of_65536():
    js = torch.zeros(65536)
    js[:6553] = 1.0  # exactly floor(P/10) ones: the score is their mean
    assert image_uncertainty(js) == pytest.approx(1.0)
    js[6553] = 1.0  # one more one does not change a top-6553 mean of ones...
    js[:6553] = 2.0  # ...but a top-6554 mean would include a 1
    assert image_uncertainty(js) == pytest.approx(2.0)


def test_c9_vote_tie_goes_to_smallest_label():
    votes = torch.tensor([7] * 5 + [3] * 5).view(10, 1)
    assert majority_vote(votes, 9).tolist() == [3]


def test_c10_default_keeps_the_900_lowest_of_1000():
    scores = np.random.default_rng(0).random(1000)
    kept = keep_indices(scores)
    assert len(kept) == 900
    assert set(kept) == set(np.argsort(scores)[:900])
    assert list(kept) == sorted(kept)


def test_c10_official_offset30_keeps_sorted_positions_30_to_929():
    scores = np.random.default_rng(1).random(1000)
    kept = keep_indices(scores, rule="official_offset30")
    order = np.argsort(scores, kind="stable")
    assert set(kept) == set(order[30:930])
    assert order[0] not in set(kept)  # the 30 most certain are dropped: the quirk
    assert len(kept) == 900


def test_c10_n300_default_keeps_270_and_the_quirk_raises():
    scores = np.arange(300.0)[::-1]
    assert len(keep_indices(scores)) == 270
    assert set(keep_indices(scores)) == set(range(30, 300))
    with pytest.raises(BenchError, match="empty slice"):
        keep_indices(scores, rule="official_offset30")


def test_c10_ties_are_stable_and_max_data_truncates_first():
    scores = np.array([1.0] * 10 + [0.0] * 10)
    # the two dropped are the LAST of the tied most uncertain (stable sort keeps file order among ties)
    assert keep_indices(scores).tolist() == [*range(8), *range(10, 20)]
    # max_data truncates in file order before sorting: ten tied 1.0s, the last one is dropped
    assert keep_indices(scores, max_data=10).tolist() == list(range(9))


@pytest.mark.parametrize("bad", [dict(rule="nope"), dict(portion=1.0), dict(portion=-0.1), dict(max_data=0),
                                 dict(max_data=21)])
def test_filter_refuses_bad_settings(bad):
    with pytest.raises(BenchError):
        keep_indices(np.zeros(20), **bad)


def test_filter_names_a_non_finite_score():
    with pytest.raises(BenchError, match="sample 3"):
        keep_indices(np.array([0.0, 1.0, 2.0, np.nan]))
