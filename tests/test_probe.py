"""The MLP-ensemble probe (spec §5, §6; checklist #14-#17)."""
import math
import re

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from helpers import blobs
from bench.probe import (EarlyStopper, EnsembleMLP, TensorPixelSource, TrainConfig, image_uncertainty,
                         js_uncertainty, majority_vote, mlp_hidden_sizes, predict_chunked, train_ensemble,
                         train_member)




class CountingSource(TensorPixelSource):
    """Records how many pixels each gather asked for."""

    def __init__(self, features, labels):
        super().__init__(features, labels)
        self.gathered: list[int] = []

    def gather(self, index):
        self.gathered.append(index.numel())
        return super().gather(index)


# ---- structure and init (#14) -------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(15, (128, 32)), (29, (128, 32)), (30, (256, 128)), (34, (256, 128))])
def test_hidden_sizes_follow_the_class_count(k, expected):
    assert mlp_hidden_sizes(k) == expected
    assert EnsembleMLP(8, k, members=1).member(0)[3].out_features == expected[1]


def test_member_layer_order_and_batchnorm_settings():
    seq = EnsembleMLP(in_dim=20, num_classes=30, members=2).member(1)
    assert [type(layer) for layer in seq] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear, nn.ReLU,
                                              nn.BatchNorm1d, nn.Linear]
    assert [(l.in_features, l.out_features) for l in seq if isinstance(l, nn.Linear)] == [(20, 256), (256, 128),
                                                                                          (128, 30)]
    for norm in (seq[2], seq[5]):
        assert (norm.momentum, norm.eps, norm.track_running_stats) == (0.1, 1e-5, True)
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
        assert torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 1)


def test_init_std_002_zero_biases_and_members_differ():
    ens = EnsembleMLP(in_dim=256, num_classes=15, members=4, seeds=[0, 1, 2, 3])
    for i in (1, 2, 3):
        weights = getattr(ens, f"linear{i}_weight")
        assert weights.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(getattr(ens, f"linear{i}_bias") == 0)
    m0, m1 = ens.member(0), ens.member(1)
    assert not torch.equal(m0[0].weight, m1[0].weight)
    again = EnsembleMLP(in_dim=256, num_classes=15, members=1, seeds=[1]).member(0)
    assert torch.equal(again[0].weight, m1[0].weight)  # a member depends on its own seed only


# ---- early stop and drop_last (#15) -------------------------------------------------------------

def test_early_stop_never_before_min_epochs():
    stopper = EarlyStopper()
    assert not any(stopper.step(epoch, 5.0) for epoch in range(4) for _ in range(500))


def test_early_stop_after_exactly_51_non_improving_batches_ties_included():
    stopper = EarlyStopper()
    assert not stopper.step(4, 1.0)  # first tracked batch improves on 1e7
    results = [stopper.step(4, 1.0) for _ in range(51)]  # ties do not improve
    assert results == [False] * 50 + [True]


def test_early_stop_counter_resets_on_strict_improvement():
    stopper = EarlyStopper()
    stopper.step(4, 1.0)
    assert not any(stopper.step(4, 2.0) for _ in range(50))
    assert not stopper.step(5, 0.999)  # strictly lower: reset, also across epochs
    assert not any(stopper.step(5, 0.999) for _ in range(50))
    assert stopper.step(5, 3.0)


def test_drop_last_130_samples_batch_64_gives_2_steps_per_epoch():
    feats, labels = blobs(130)
    config = TrainConfig(members=2, max_epochs=3)
    _, infos = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1], config=config, progress=False)
    assert [(i["steps"], i["epochs"], i["stop_epoch"]) for i in infos] == [(6, 3, None)] * 2
    _, info = train_member(TensorPixelSource(feats, labels), 3, seed=0, config=config)
    assert (info["steps"], info["epochs"]) == (6, 3)


# ---- training ------------------------------------------------------------------------------------

def test_ensemble_learns_separable_blobs():
    feats, labels = blobs(1280, seed=1)
    ens, infos = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1, 2, 3, 4], progress=False,
                                config=TrainConfig(members=5, max_epochs=6))
    test_feats, test_labels = blobs(2000, seed=1, sample_seed=99)  # same blobs, unseen points
    predicted, _ = predict_chunked(ens, lambda s: test_feats[s], 2000, chunk=512)
    assert (predicted == test_labels).float().mean().item() > 0.95
    assert all(i["steps"] > 0 for i in infos)


def test_batched_equals_sequential_reference_with_staggered_stops():
    feats, labels = blobs(640)
    source = CountingSource(feats, labels)
    seeds = [3, 4, 5]
    # Short patience so members stop at different steps: exercises the active-set shrinking.
    config = TrainConfig(members=3, max_epochs=10, min_epochs=1, patience=3)
    ens, infos = train_ensemble(source, 3, seeds=seeds, config=config, progress=False)
    assert len({i["steps"] for i in infos}) > 1, "test data should make members stop at different steps"
    # Stopped members are no longer gathered: batch sizes shrink from 3*64 to fewer members.
    assert source.gathered[0] == 3 * 64 and min(source.gathered) < 3 * 64
    batched_labels, _ = ens.predict(feats)
    for m, seed in enumerate(seeds):
        reference, info = train_member(TensorPixelSource(feats, labels), 3, seed=seed, config=config)
        assert (info["steps"], info["epochs"], info["stop_epoch"]) == (
            infos[m]["steps"], infos[m]["epochs"], infos[m]["stop_epoch"])
        mine = ens.member(m).state_dict()
        for name, value in reference.state_dict().items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(mine[name], value, atol=1e-5, rtol=0, msg=name)
        with torch.no_grad():
            assert torch.equal(reference(feats).argmax(1), batched_labels[m])


def test_training_rejects_bad_input():
    feats, labels = blobs(130)
    with pytest.raises(BenchError, match="2 seeds for 10 members"):
        train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1], progress=False)
    with pytest.raises(BenchError, match="training label 3"):
        train_member(TensorPixelSource(feats, labels.clamp(max=2) + (labels == 2).long()), 3, seed=0)
    with pytest.raises(BenchError, match="fewer than one batch"):
        train_member(TensorPixelSource(feats[:10], labels[:10]), 3, seed=0)


# ---- voting and uncertainty (#16, #17) -----------------------------------------------------------

def test_majority_vote_mode_and_ties_to_smallest_id():
    votes = torch.tensor([[3, 1], [3, 2], [7, 2], [7, 2], [3, 0], [7, 9], [3, 9], [7, 9], [3, 9], [7, 9]])
    assert majority_vote(votes).tolist() == [3, 9]  # column 0: 5-5 tie -> 3; column 1: 9 has 4 votes
    assert majority_vote(torch.tensor([[7], [7], [3]])).tolist() == [7]


def _fixed_logit_ensemble(logits: torch.Tensor) -> EnsembleMLP:
    """An ensemble whose member m outputs ``logits[m]`` for every pixel."""
    members, classes = logits.shape
    ens = EnsembleMLP(in_dim=4, num_classes=classes, members=members).eval()
    with torch.no_grad():
        ens.linear3_weight.zero_()
        ens.linear3_bias.copy_(logits.unsqueeze(1))
    return ens


def test_vote_wins_over_mean_softmax():
    logits = torch.tensor([[2.0, 1.9, -10.0], [2.0, 1.9, -10.0], [-10.0, 10.0, -10.0]])
    ens = _fixed_logit_ensemble(logits)
    assert logits.softmax(-1).mean(0).argmax().item() == 1  # the mean softmax would say 1
    labels, _ = predict_chunked(ens, lambda s: torch.randn(s.stop - s.start, 4), 5)
    assert labels.tolist() == [0] * 5  # two of three members say 0


def test_js_uncertainty_zero_for_identical_members_ln2_for_confident_disagreement():
    probs = torch.randn(1, 6, 4).softmax(-1).expand(10, 6, 4)
    torch.testing.assert_close(js_uncertainty(probs), torch.zeros(6), atol=1e-6, rtol=0)
    confident = torch.tensor([[1e4, -1e4], [-1e4, 1e4]]).softmax(-1).unsqueeze(1)  # [2 members, 1 px, 2]
    assert js_uncertainty(confident).item() == pytest.approx(math.log(2), abs=1e-6)
    _, js = predict_chunked(_fixed_logit_ensemble(torch.tensor([[50.0, -50.0], [-50.0, 50.0]])),
                            lambda s: torch.zeros(s.stop - s.start, 4), 3)
    torch.testing.assert_close(js, torch.full((3,), math.log(2)), atol=1e-5, rtol=0)


def test_image_uncertainty_is_mean_of_top_tenth():
    js = torch.randperm(25).float()  # values 0..24, shuffled
    assert image_uncertainty(js) == pytest.approx((24 + 23) / 2)  # floor(25/10) = 2
    assert image_uncertainty(torch.tensor([0.1, 0.5, 0.2])) == pytest.approx(0.5)  # at least one value


def test_predict_chunked_matches_one_chunk():
    feats, _ = blobs(300)
    ens = EnsembleMLP(16, 3, members=3, seeds=[0, 1, 2]).eval()
    whole = predict_chunked(ens, lambda s: feats[s], 300, chunk=10_000)
    chunked = predict_chunked(ens, lambda s: feats[s], 300, chunk=7)
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1])
    member_labels, _ = ens.predict(feats)
    assert torch.equal(whole[0], majority_vote(member_labels))


# ---- step-loop fast paths: same results as the plain ones ----------------------------------------

class CostlySource(TensorPixelSource):
    """Declares a costly gather, so the probe loads batches in its background prefetch thread."""

    gather_is_costly = True


def _assert_same_training(a, b):
    (ens_a, infos_a), (ens_b, infos_b) = a, b
    assert infos_a == infos_b
    state_a, state_b = ens_a.state_dict(), ens_b.state_dict()
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


STAGGERED = TrainConfig(members=3, max_epochs=10, min_epochs=1, patience=3)


@pytest.mark.parametrize("threads", [1, 2])
def test_inline_and_prefetched_batches_train_bit_identically(monkeypatch, threads):
    import bench.probe as probe

    feats, labels = blobs(640)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for prefetch in (False, True):
            monkeypatch.setattr(probe, "_prefetch_batches", lambda source, config, device: prefetch)
            runs.append(train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[3, 4, 5], config=STAGGERED,
                                       progress=False))
        monkeypatch.undo()
        # A costly source also prefetches, with one intra-op thread fewer meanwhile.
        runs.append(train_ensemble(CostlySource(feats, labels), 3, seeds=[3, 4, 5], config=STAGGERED,
                                   progress=False))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert len({i["steps"] for i in runs[0][1]}) > 1  # members retire at different steps, mid-epoch
    _assert_same_training(runs[0], runs[1])
    if threads == 1:  # with 2 threads the costly run trains with 1: batch norm rounds differently
        _assert_same_training(runs[0], runs[2])


def test_cheap_gather_prefetches_only_into_an_idle_core_and_for_large_batches(monkeypatch):
    import bench.probe as probe

    monkeypatch.setattr(probe.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    big = TensorPixelSource(torch.zeros(64, 864), torch.zeros(64, dtype=torch.long))  # 10*64*864*4 B > 1 MiB
    small = TensorPixelSource(torch.zeros(64, 5), torch.zeros(64, dtype=torch.long))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert probe._prefetch_batches(big, TrainConfig(), "cpu")
        assert not probe._prefetch_batches(small, TrainConfig(), "cpu")
        assert probe._prefetch_batches(CostlySource(torch.zeros(64, 5), torch.zeros(64, dtype=torch.long)),
                                       TrainConfig(), "cpu")
        torch.set_num_threads(2)
        assert not probe._prefetch_batches(big, TrainConfig(), "cpu")  # no idle core for the loader
    finally:
        torch.set_num_threads(before)


def test_direct_fused_adam_step_is_bit_identical_to_optimizer_step(monkeypatch):
    import bench.probe as probe

    working = probe._ActiveMembers(EnsembleMLP(16, 3, members=2), lr=1e-3)
    for _ in range(2):
        working.zero_grad()
        probe._ensemble_forward(working.params, working.buffers, torch.randn(2, 8, 16), training=True).sum().backward()
        working.step()
    if working.optimizer.param_groups[0].get("fused"):
        assert working._fused is not None  # the direct path is the one in use

    feats, labels = blobs(640)
    fast = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[3, 4, 5], config=STAGGERED, progress=False)
    monkeypatch.setattr(probe._ActiveMembers, "_fused_args", lambda self: None)  # optimizer.step() every step
    plain = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[3, 4, 5], config=STAGGERED, progress=False)
    _assert_same_training(fast, plain)


@pytest.mark.parametrize("config", [
    TrainConfig(members=2, max_epochs=3),  # all epochs before min_epochs: losses read once per epoch
    TrainConfig(members=2, max_epochs=4, min_epochs=2, patience=2),  # tracked epochs with early stops
    TrainConfig(members=2, max_epochs=5, max_steps=13),  # budget ends mid-epoch
])
def test_infos_match_the_sequential_reference(config):
    feats, labels = blobs(640)
    _, infos = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[3, 4], config=config, progress=False)
    for m, seed in enumerate([3, 4]):
        _, info = train_member(TensorPixelSource(feats, labels), 3, seed=seed, config=config)
        assert (infos[m]["steps"], infos[m]["epochs"], infos[m]["stop_epoch"]) == (
            info["steps"], info["epochs"], info["stop_epoch"])
        assert infos[m]["final_loss"] == pytest.approx(info["final_loss"], abs=1e-5)


def test_progress_off_a_terminal_is_one_status_line_not_a_bar(capsys, monkeypatch):
    monkeypatch.delenv("BENCH_STATUS_EVERY", raising=False)  # default: a line every 30 s, and one at the end
    feats, labels = blobs(640)
    train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1], config=TrainConfig(members=2, max_epochs=2))
    err = capsys.readouterr().err
    assert "\r" not in err
    [line] = err.splitlines()
    assert re.fullmatch(r"probe epoch 1, 2/2 members: 10/10 step, \d+ s", line), line


def test_take_rows_is_index_select_bit_for_bit():
    from bench.probe_data import take_rows

    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 37, generator=g)
    base[3, 5], base[7, 1] = float("nan"), float("-inf")
    index = torch.randint(0, 50, (23,), generator=g)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        table = base.to(dtype)
        got, want = take_rows(table, index), table.index_select(0, index)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))  # NaN payloads too
    strided = base.t().contiguous().t()  # not contiguous: the plain index_select path
    assert torch.equal(take_rows(strided, index), base.index_select(0, index))
