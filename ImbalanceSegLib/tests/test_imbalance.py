import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from imbalanceseglib.class_weights import (
    ClassConfidence,
    ClassDice,
    ConfidenceDifficultyWeights,
    DifficultyWeights,
    DistributionWeights,
    class_voxel_counts,
    per_class_batch_dice,
    per_class_confidence,
)
from imbalanceseglib.perturbations import asymmetric_adversarial_input, asymmetric_mixup


def _roundtrip(state):
    text = json.dumps(state)  # must be plain JSON: lists, floats, ints, bools, strings
    return json.loads(text)


# --------------------------------------------------------------------------- #
# DisW
# --------------------------------------------------------------------------- #


def test_distribution_weights_by_hand():
    w = DistributionWeights(4, momentum=0.9)
    assert w.weights.tolist() == [4.0, 4.0, 4.0, 4.0]  # uniform (max C) before any update
    # ratios to the largest count: 1, 10, 100, 1000 -> logs 0, ln10, 2 ln10, 3 ln10 -> / (3 ln10) * C
    w.update([1000, 100, 10, 1])
    assert w.weights.tolist() == pytest.approx([0.0, 4 / 3, 8 / 3, 4.0], abs=1e-6)
    # second batch: ratios 1, 1, 10, 10 -> [0, 0, 4, 4]; EMA 0.9 * old + 0.1 * new
    w.update(torch.tensor([100, 100, 10, 10]))
    expected = [0.9 * 0 + 0.1 * 0, 0.9 * 4 / 3 + 0.1 * 0, 0.9 * 8 / 3 + 0.1 * 4, 0.9 * 4 + 0.1 * 4]
    assert expected == pytest.approx([0.0, 1.2, 2.8, 4.0])
    assert w.weights.tolist() == pytest.approx(expected, abs=1e-6)
    assert w.weights.dtype == torch.float32 and w.num_updates == 2


def test_distribution_weights_floor():
    # counts 100, 10, 1 -> logs 0, ln10, 2 ln10 -> C * [0, 1/2, 1] = [0, 1.5, 3]; floor 1 lifts only the first
    w = DistributionWeights(3, min_weight=1.0)
    w.update([100, 10, 1])
    assert w.weights.tolist() == pytest.approx([1.0, 1.5, 3.0], abs=1e-6)
    assert w.current_weights([100, 10, 1]).tolist() == pytest.approx([0.0, 1.5, 3.0], abs=1e-6)  # raw, unfloored
    # the floor is applied to the EMA state when read, not folded into it
    w.update([100, 100, 100])  # uniform counts -> cur = [3, 3, 3]; EMA 0.99
    assert w.weights.tolist() == pytest.approx([max(1.0, 0.03), 0.99 * 1.5 + 0.03, 3.0], abs=1e-6)
    # the default keeps DHC's rule (zero for the most frequent class)
    assert DistributionWeights(3).update([100, 10, 1]).tolist()[0] == 0.0
    for bad in (-0.1, 3.5, float("nan")):
        with pytest.raises(ValueError, match="min_weight"):
            DistributionWeights(3, min_weight=bad)
    # a state saved before the floor existed loads into a default (floor 0) object, not into a floored one
    old = DistributionWeights(3).state_dict()
    del old["min_weight"]
    DistributionWeights(3).load_state_dict(old)
    with pytest.raises(ValueError, match="min_weight"):
        DistributionWeights(3, min_weight=1.0).load_state_dict(old)


def test_distribution_weights_edge_counts():
    # a class missing from the counts, with eps=1: (99+1)/(9+1) = 10, (99+1)/(0+1) = 100
    w = DistributionWeights(3, eps=1.0)
    w.update(np.array([99, 9, 0]))
    assert w.weights.tolist() == pytest.approx([0.0, 3 * math.log(10) / math.log(100), 3.0], abs=1e-6)
    # all classes equally frequent: no imbalance, uniform weights
    assert DistributionWeights(3).current_weights([5, 5, 5]).tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        w.update([1, 2])
    with pytest.raises(ValueError):
        w.update([1, -2, 3])


def test_class_voxel_counts():
    labels = torch.tensor([[[0, 0, 2], [2, 2, 0]]])
    assert class_voxel_counts(labels, 4).tolist() == [3.0, 0.0, 3.0, 0.0]
    with pytest.raises(ValueError):
        class_voxel_counts(labels, 2)


# --------------------------------------------------------------------------- #
# DifW
# --------------------------------------------------------------------------- #


def test_difficulty_weights_by_hand():
    eps = 1e-8
    w = DifficultyWeights(2, tau=2, alpha=0.5, eps=eps)  # momentum (tau-1)/tau = 0.5
    assert w.momentum == 0.5
    assert w.weights.tolist() == [2.0, 2.0]  # uniform before any update
    w.update([0.5, 0.25])
    w.update(torch.tensor([0.6, 0.2], dtype=torch.float64))
    # class 0: 1e-8 -> 0.5 -> 0.6, learned twice
    learn0 = 0.5 * (0.5 * (0.5 - eps) * math.log(0.5 / eps)) + 0.5 * (0.1 * math.log(0.6 / 0.5))
    unlearn0 = 0.0
    dicew0 = 0.5 * (0.5 * 1 + 0.5 * (1 - 0.5)) + 0.5 * (1 - 0.6)
    # class 1: 1e-8 -> 0.25 (learned) -> 0.2 (unlearned: delta -0.05, log(0.8) < 0, product > 0)
    learn1 = 0.5 * (0.5 * (0.25 - eps) * math.log(0.25 / eps)) + 0.5 * 0.0
    unlearn1 = 0.5 * 0.0 + 0.5 * ((0.2 - 0.25) * math.log(0.2 / 0.25))
    dicew1 = 0.5 * (0.5 * 1 + 0.5 * (1 - 0.25)) + 0.5 * (1 - 0.2)
    assert dicew0 == pytest.approx(0.575) and dicew1 == pytest.approx(0.8375)
    raw0 = math.sqrt((unlearn0 + eps) / (learn0 + eps)) * dicew0
    raw1 = math.sqrt((unlearn1 + eps) / (learn1 + eps)) * dicew1
    top = max(raw0, raw1)
    assert w.raw_weights().tolist() == pytest.approx([raw0, raw1], rel=1e-12)
    assert w.weights.tolist() == pytest.approx([2 * raw0 / top, 2 * raw1 / top], rel=1e-6)
    # the class being unlearned is the difficult one
    assert w.weights[1] == 2.0 and w.weights[0] < 0.01


def test_difficulty_weights_absent_class_keeps_its_state():
    w = DifficultyWeights(3, tau=4)
    w.update([0.9, 0.5, 0.3])
    before = w.state_dict()
    d = ClassDice.from_sums(torch.tensor([1.8, 0.8, 0.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 0.0]))
    assert d.present.tolist() == [True, True, False] and d.dice.tolist() == [0.9, 0.4, 1.0]
    w.update(d)
    after = w.state_dict()
    for key in ("last_dice", "learn", "unlearn", "dice_weight"):
        assert after[key][2] == before[key][2]
    assert after["last_dice"][1] == 0.4 and after["dice_weight"][1] != before["dice_weight"][1]
    # an explicit mask does the same
    w.update([0.1, 0.1, 0.1], present=[True, False, False])
    assert w.state_dict()["last_dice"] == [0.1, 0.4, before["last_dice"][2]]
    with pytest.raises(ValueError):
        w.update([0.5, 1.5, 0.2])


# --------------------------------------------------------------------------- #
# CDifW
# --------------------------------------------------------------------------- #


def test_confidence_difficulty_weights_by_hand():
    w = ConfidenceDifficultyWeights(3, conf_momentum=0.9)
    # equal Dice for every class: DifW stays uniform, so the weights are the confidence term alone
    w.update([0.5, 0.5, 0.5], [0.9, 0.6, 0.3])
    assert w.difficulty.weights.tolist() == [3.0, 3.0, 3.0]
    # 1 - c = 0.1, 0.4, 0.7; u = ((1 - c + 0.01) / (0.7 + 0.01)) ** 0.2
    u = [(0.11 / 0.71) ** 0.2, (0.41 / 0.71) ** 0.2, 1.0]
    conf = [0.9 * 1 + 0.1 * u[0], 0.9 * 1 + 0.1 * u[1], 0.9 * 1 + 0.1 * u[2]]
    assert conf[2] == 1.0
    assert w.confidence_weights.tolist() == pytest.approx(conf, rel=1e-6)
    assert w.weights.tolist() == pytest.approx([3 * conf[0], 3 * conf[1], 3.0], rel=1e-6)


def test_confidence_difficulty_is_normalised_product():
    dice_seq = [[0.9, 0.3, 0.1], [0.92, 0.35, 0.05], [0.93, 0.3, 0.2]]
    conf_seq = [[0.95, 0.7, 0.2], [0.96, 0.6, 0.4], [0.97, 0.8, 0.1]]
    cd = ConfidenceDifficultyWeights(3, tau=5, conf_momentum=0.5)
    d = DifficultyWeights(3, tau=5)
    for dice, conf in zip(dice_seq, conf_seq):
        cd.update(dice, conf)
        d.update(dice)
    prod = d.raw_weights() * cd._conf
    assert cd.weights.tolist() == pytest.approx((3 * prod / prod.max()).tolist(), rel=1e-6)
    assert float(cd.weights.max()) == pytest.approx(3.0)


def test_confidence_folding_and_absent_classes():
    w = ConfidenceDifficultyWeights(3, conf_momentum=0.5, fold_every=2)
    w.update([0.5] * 3, [0.9, 0.6, 0.3])
    assert w.confidence_weights.tolist() == [1.0, 1.0, 1.0]  # nothing folded yet
    # second batch: class 2 absent (count 0) -> not in the max, not averaged
    c2 = ClassConfidence.from_sums(torch.tensor([1.6, 0.0, 0.0]), torch.tensor([3.0, 1.0, 0.0]))
    assert c2.confidence.tolist() == pytest.approx([(1.6 + 1) / 4, 0.5, 1.0])
    assert c2.present.tolist() == [True, True, False]
    w.update([0.5] * 3, c2)
    u1 = [(0.11 / 0.71) ** 0.2, (0.41 / 0.71) ** 0.2, 1.0]
    # batch 2: 1 - c = [0.35, 0.5] over the present classes, max 0.5
    u2 = [(0.35 + 0.01) / 0.51, 1.0]
    u2 = [u2[0] ** 0.2, 1.0]
    expected = [0.5 + 0.5 * (u1[0] + u2[0]) / 2, 0.5 + 0.5 * (u1[1] + u2[1]) / 2, 0.5 + 0.5 * u1[2]]
    assert w.confidence_weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_difficulty_and_confidence_weights_floor():
    # DifW after one update from Dice 0 (uniform by hand above is not needed here): the weights a floor of 1
    # leaves alone are the unfloored ones, and the learned class (near 0 unfloored) is lifted to exactly 1
    seq = [([0.9, 0.3, 0.1], [0.95, 0.7, 0.2]), ([0.95, 0.2, 0.15], [0.97, 0.6, 0.3])]
    for make in (lambda **k: DifficultyWeights(3, tau=2, **k),
                 lambda **k: ConfidenceDifficultyWeights(3, tau=2, conf_momentum=0.5, **k)):
        plain, floored = make(), make(min_weight=1.0)
        for dice, conf in seq:
            args = (dice,) if isinstance(plain, DifficultyWeights) else (dice, conf)
            plain.update(*args)
            floored.update(*args)
        raw = plain.weights.tolist()
        assert raw[0] < 0.5 and max(raw) == pytest.approx(3.0)  # the learned class 0 is near 0 without the floor
        assert floored.weights.tolist() == pytest.approx([max(1.0, v) for v in raw], abs=1e-6)
        # the floor is read, not folded into the state: the same state as without it
        ps, fs = plain.state_dict(), floored.state_dict()
        assert fs.pop("min_weight") == 1.0 and ps.pop("min_weight") == 0.0 and ps == fs
        for bad in (-1, 3.5, float("nan"), True, "1"):
            with pytest.raises(ValueError, match="min_weight"):
                make(min_weight=bad)
        # a state saved before the floor existed loads into a floor-0 object only
        old = make().state_dict()
        del old["min_weight"]
        make().load_state_dict(old)
        with pytest.raises(ValueError, match="min_weight"):
            make(min_weight=1.0).load_state_dict(old)


def test_state_dict_roundtrip_is_exact():
    rng = np.random.default_rng(0)
    objs = [DistributionWeights(4, momentum=0.7), DifficultyWeights(4, tau=3),
            ConfidenceDifficultyWeights(4, tau=3, fold_every=3)]

    def feed(obj, r):
        if isinstance(obj, DistributionWeights):
            obj.update(r.integers(0, 1000, 4))
        elif isinstance(obj, DifficultyWeights):
            obj.update(r.uniform(0, 1, 4))
        else:
            obj.update(r.uniform(0, 1, 4), r.uniform(0, 1, 4))

    for obj in objs:
        for _ in range(5):  # 5 updates: the CDifW has 2 pending (unfolded) updates
            feed(obj, rng)
        clone = type(obj)(4, **({"momentum": 0.7} if isinstance(obj, DistributionWeights) else
                                {"tau": 3} if isinstance(obj, DifficultyWeights) else {"tau": 3, "fold_every": 3}))
        clone.load_state_dict(_roundtrip(obj.state_dict()))
        assert torch.equal(clone.weights, obj.weights)
        state = np.random.default_rng(1).bit_generator.state
        r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
        r2.bit_generator.state = state
        feed(obj, r1)
        feed(clone, r2)
        assert torch.equal(clone.weights, obj.weights)
        assert clone.state_dict() == obj.state_dict()
    with pytest.raises(ValueError):
        DifficultyWeights(5, tau=3).load_state_dict(objs[1].state_dict())
    with pytest.raises(ValueError):
        DifficultyWeights(4, tau=3).load_state_dict(objs[0].state_dict())


# --------------------------------------------------------------------------- #
# Per-class statistics
# --------------------------------------------------------------------------- #


def test_per_class_batch_dice_hard_and_soft():
    target = torch.tensor([[[0, 0, 1, 1]]])  # (N=1, 1, 4)
    probs = torch.tensor([[[0.8, 0.3, 0.1, 0.2],
                           [0.1, 0.6, 0.7, 0.7],
                           [0.1, 0.1, 0.2, 0.1]]])  # argmax 0, 1, 1, 1
    logits = probs.log()
    d = per_class_batch_dice(logits, target)
    # class 0: tp 1, |P| 1, |G| 2 -> 2/3; class 1: tp 2, |P| 3, |G| 2 -> 4/5; class 2 absent from both
    assert d.dice.tolist() == pytest.approx([2 / 3, 4 / 5, 1.0])
    assert d.present.tolist() == [True, True, False]
    assert d.numerator.tolist() == [2.0, 4.0, 0.0] and d.denominator.tolist() == [3.0, 5.0, 0.0]
    s = per_class_batch_dice(logits, target[:, 0], soft=True)
    # soft: 2 * sum(p * g) / (sum p + sum g)
    exp0 = 2 * (0.8 + 0.3) / (1.4 + 2)
    exp1 = 2 * (0.7 + 0.7) / (2.1 + 2)
    exp2 = 0.0 / (0.5 + 0)
    assert s.dice.tolist() == pytest.approx([exp0, exp1, exp2], rel=1e-5)
    assert s.present.all()
    assert not torch.isnan(d.dice).any() and not torch.isnan(s.dice).any()


def test_per_class_confidence_by_hand():
    target = torch.tensor([[[0, 0, 1, 1]]])
    probs = torch.tensor([[[0.8, 0.3, 0.1, 0.2],
                           [0.1, 0.6, 0.7, 0.7],
                           [0.1, 0.1, 0.2, 0.1]]])
    c = per_class_confidence(probs.log(), target)
    # labelled: class 0 voxels have p0 = 0.8, 0.3; class 1 voxels p1 = 0.7, 0.7; class 2 none
    assert c.prob_sum.tolist() == pytest.approx([1.1, 1.4, 0.0], rel=1e-6)
    assert c.count.tolist() == [2.0, 2.0, 0.0]
    assert c.confidence.tolist() == pytest.approx([2.1 / 3, 2.4 / 3, 1.0], rel=1e-6)
    assert c.present.tolist() == [True, True, False]
    u = per_class_confidence(probs.log(), smoothing=0.0)
    # unlabelled: predicted 0 at voxel 0 (max 0.8), 1 at voxels 1-3 (max 0.6, 0.7, 0.7)
    assert u.confidence.tolist() == pytest.approx([0.8, 2.0 / 3, 1.0], rel=1e-6)
    assert u.present.tolist() == [True, True, False]


# --------------------------------------------------------------------------- #
# Asymmetric mixup
# --------------------------------------------------------------------------- #


def _mixup_pair():
    # 5 voxels: (a, b) labels = (2, 0), (0, 2), (1, 0), (2, 2), (0, 0)
    y_a = torch.tensor([2, 0, 1, 2, 0]).reshape(1, 1, 5)
    y_b = torch.tensor([0, 2, 0, 2, 0]).reshape(1, 1, 5)
    x_a = torch.linspace(0, 1, 5).reshape(1, 1, 5)
    x_b = torch.linspace(2, -1, 5).reshape(1, 1, 5)
    return x_a, y_a, x_b, y_b


def test_asymmetric_mixup_rule_by_hand():
    x_a, y_a, x_b, y_b = _mixup_pair()
    rare = [False, False, True]
    x_mix, y, lam = asymmetric_mixup(x_a, y_a, x_b, y_b, rare, margin=0.5, lam=0.75)
    assert lam == 0.75 and y.shape == (1, 3, 5)
    assert torch.equal(x_mix, 0.75 * x_a + 0.25 * x_b)
    got = y[0].T.tolist()
    assert got[0] == [0.0, 0.0, 1.0]      # rare in a, a weighs 0.75 > 0.5: hard rare label
    assert got[1] == [0.75, 0.0, 0.25]    # rare in b, b weighs 0.25 <= 0.5: mixed
    assert got[2] == [0.25, 0.75, 0.0]    # no rare class: ordinary mixup
    assert got[3] == [0.0, 0.0, 1.0]      # rare in both
    assert got[4] == [1.0, 0.0, 0.0]
    # the other way round
    _, y, _ = asymmetric_mixup(x_a, y_a, x_b, y_b, rare, margin=0.5, lam=0.25)
    got = y[0].T.tolist()
    assert got[0] == [0.75, 0.0, 0.25] and got[1] == [0.0, 0.0, 1.0]
    # the margin is strict: weight exactly at the margin mixes
    _, y, _ = asymmetric_mixup(x_a, y_a, x_b, y_b, rare, margin=0.75, lam=0.75)
    assert y[0].T.tolist()[0] == [0.25, 0.0, 0.75]
    # margin < 0.5: both rare labels qualify -> ordinary soft mix between them
    _, y, _ = asymmetric_mixup(x_a[..., :1], torch.tensor([[[2]]]), x_b[..., :1], torch.tensor([[[1]]]),
                               [False, True, True], margin=0.3, lam=0.6)
    assert y[0, :, 0].tolist() == pytest.approx([0.0, 0.4, 0.6])


def test_asymmetric_mixup_random_batch_properties():
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2, 1, 6, 7, 5, generator=g), torch.randn(2, 1, 6, 7, 5, generator=g)
    y_a, y_b = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g), torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    rare = torch.tensor([False, False, True, True])
    for seed in range(20):
        x_mix, y, lam = asymmetric_mixup(x_a, y_a, x_b, y_b, rare, alpha=0.3, margin=0.5, rng=seed)
        assert torch.equal(x_mix, lam * x_a + (1 - lam) * x_b)
        assert torch.allclose(y.sum(1), torch.ones(2, 6, 7, 5))
        assert (y >= 0).all()
        la, lb = y_a[:, 0], y_b[:, 0]
        heavy_rare = (rare[la] & (lam > 0.5)) | (rare[lb] & (1 - lam > 0.5))
        src = torch.where(rare[la] & (lam > 0.5), la, lb)
        hard = torch.nn.functional.one_hot(src, 4).movedim(-1, 1).float()
        assert torch.equal(y.movedim(1, -1)[heavy_rare], hard.movedim(1, -1)[heavy_rare])
        soft = lam * torch.nn.functional.one_hot(la, 4) + (1 - lam) * torch.nn.functional.one_hot(lb, 4)
        assert torch.allclose(y.movedim(1, -1)[~heavy_rare], soft.float()[~heavy_rare])


def test_asymmetric_mixup_lambda_is_beta_and_seeded():
    x_a, y_a, x_b, y_b = _mixup_pair()
    rng = np.random.default_rng(123)
    lams = np.array([asymmetric_mixup(x_a, y_a, x_b, y_b, [False, False, True], alpha=0.3, rng=rng)[2]
                     for _ in range(2000)])
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * 0.3 + 1)), abs=0.01)  # Beta(a, a) variance
    assert stats.kstest(lams, "beta", args=(0.3, 0.3)).pvalue > 0.01
    assert (lams < 0.5).mean() == pytest.approx(0.5, abs=0.05)  # lam is not folded to max(lam, 1 - lam)
    # deterministic under a seeded generator
    r1 = asymmetric_mixup(x_a, y_a, x_b, y_b, [False, False, True], rng=np.random.default_rng(7))
    r2 = asymmetric_mixup(x_a, y_a, x_b, y_b, [False, False, True], rng=np.random.default_rng(7))
    assert r1[2] == r2[2] and torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert r1[2] == np.random.default_rng(7).beta(0.3, 0.3)


def test_asymmetric_mixup_checks_inputs():
    x_a, y_a, x_b, y_b = _mixup_pair()
    with pytest.raises(ValueError):
        asymmetric_mixup(x_a, y_a, x_b, y_b, [False, True])  # label 2 but 2 classes
    with pytest.raises(ValueError):
        asymmetric_mixup(x_a, y_a, x_b[..., :4], y_b[..., :4], [False, False, True])
    with pytest.raises(ValueError):
        asymmetric_mixup(x_a, y_a, x_b, y_b, [False, False, True], lam=1.5)


# --------------------------------------------------------------------------- #
# Asymmetric adversarial training
# --------------------------------------------------------------------------- #


def _tiny_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv3d(1, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm3d(6))
    layers += [nn.Tanh(), nn.Conv3d(6, 3, 1)]
    return nn.Sequential(*layers)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 6, 6, generator=g)
    y = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    y[:, :, 1:3] = 1
    y[0, 0, 4, 2:4, 2:4] = 2
    y[1, 0, 3:5, 0, 0] = 2
    return x, y


def _rare_ce(net, x, y, rare):
    with torch.no_grad():
        ce = nn.functional.cross_entropy(net(x), y[:, 0], reduction="none")
        return float((ce * rare[y[:, 0]]).sum())


def test_adversarial_norm_direction_and_no_side_effects():
    net = _tiny_net().train()
    x, y = _batch()
    rare = torch.tensor([False, False, True])
    eps = 0.5
    x_adv = asymmetric_adversarial_input(net, x, y, rare, epsilon=eps, generator=torch.Generator().manual_seed(0))
    r = (x_adv - x).double().reshape(2, -1)
    assert r.norm(dim=1).tolist() == pytest.approx([eps, eps], rel=1e-4)
    assert not x_adv.requires_grad
    assert net.training  # mode restored
    assert all(p.grad is None for p in net.parameters())
    # the adversarial direction raises the rare-class loss more than random directions of the same norm
    base = _rare_ce(net.eval(), x, y, rare)
    adv = _rare_ce(net, x_adv, y, rare)
    g = torch.Generator().manual_seed(5)
    rand = []
    for _ in range(20):
        d = torch.randn(x.shape, generator=g)
        d = eps * d / d.reshape(2, -1).norm(dim=1).reshape(2, 1, 1, 1, 1)
        rand.append(_rare_ce(net, x + d, y, rare))
    assert adv - base > 0
    assert adv - base > 3 * max(abs(v - base) for v in rand)
    # deterministic under a seeded generator
    again = asymmetric_adversarial_input(net, x, y, rare, epsilon=eps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, x_adv)
    assert not net.training


def test_adversarial_without_rare_voxels_and_existing_grads():
    net = _tiny_net().eval()
    x, y = _batch()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    y_no_rare = y.clamp(max=1)
    out = asymmetric_adversarial_input(net, x, y_no_rare, [False, False, True], epsilon=1.0)
    assert torch.equal(out, x) and not calls
    # gradients already accumulated by the caller are left exactly as they were
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    asymmetric_adversarial_input(net, x, y, [False, False, True], epsilon=1.0)
    assert calls and all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in net.parameters())
    # one sample without rare voxels: that sample is unchanged, the other is perturbed
    y_one = y.clone()
    y_one[1] = y_one[1].clamp(max=1)
    out = asymmetric_adversarial_input(net, x, y_one, [False, False, True], epsilon=1.0)
    assert torch.equal(out[1], x[1])
    assert float((out[0] - x[0]).norm()) == pytest.approx(1.0, rel=1e-4)


def test_adversarial_train_mode_keeps_batchnorm_statistics_and_kl_variant():
    net = _tiny_net(bn=True).eval()
    x, y = _batch()
    before = [b.clone() for b in net.buffers()]
    out = asymmetric_adversarial_input(net, x, y, [False, False, True], epsilon=2.0, network_mode="train")
    assert not net.training
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    assert (out - x).reshape(2, -1).norm(dim=1).tolist() == pytest.approx([2.0, 2.0], rel=1e-4)
    # KL (virtual adversarial) variant, with a random start large enough to be felt in float32
    out = asymmetric_adversarial_input(net, x, y, [False, False, True], epsilon=2.0, xi=1.0, loss="kl",
                                       generator=torch.Generator().manual_seed(3))
    assert (out - x).reshape(2, -1).norm(dim=1).tolist() == pytest.approx([2.0, 2.0], rel=1e-4)
    with pytest.raises(ValueError):
        asymmetric_adversarial_input(net, x, y, [False, False, True], loss="mse")
