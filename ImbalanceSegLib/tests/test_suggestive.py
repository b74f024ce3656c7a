"""Suggestive annotation (issue #23 item 3: Yang et al., MICCAI 2017): which unlabelled scans to
annotate next, from uncertainty and representativeness; selections and scores worked out by hand."""

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import load_bundle, save_bundle
from imbalanceseglib.images import ImageError
from imbalanceseglib.networks import build_network
from imbalanceseglib.suggestive import (STRATEGIES, SuggestionError, cosine_similarity, encoder_features,
                                        expected_dice, rank_for_annotation, representativeness, scan_features,
                                        scan_uncertainty, select)

NAMES = ["Background", "Ball", "Bead"]

# Two clusters: scans 0, 1, 2 look alike (A), scans 3, 4 look alike (B); 0 and 1 are the most uncertain.
CLUSTERS = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], float)
CLUSTER_U = np.array([0.9, 0.8, 0.3, 0.7, 0.2])


# --------------------------------------------------------------------------- selection, by hand


def test_greedy_max_cover_picks_one_scan_per_cluster():
    # K = 2 x 2 = 4 candidates: 0, 1, 3, 2 (most uncertain first).  First pick: any scan of A covers
    # 3 scans (similarity 1 to each), of B 2 -> the most uncertain of A, scan 0 (gain 3).  Then A is
    # covered (gain 0 for 1 and 2) and scan 3 covers B (gain 2).  F = 5.  The two most uncertain
    # (0 and 1, both from A) would cover only 3.
    sel = select(CLUSTER_U, CLUSTERS, 2, "suggestive")
    assert sel.candidates == [0, 1, 3, 2]
    assert sel.chosen == [0, 3]
    assert sel.order == [0, 3, 1, 2, 4]
    assert sel.gains[0] == pytest.approx(3) and sel.gains[3] == pytest.approx(2)
    assert sel.gains[[1, 2, 4]] == pytest.approx([0, 0, 0])
    assert sel.value == pytest.approx(5) == representativeness(CLUSTERS, [0, 3])
    assert sel.covered_by == [("chosen", 0), ("chosen", 0), ("chosen", 0), ("chosen", 3), ("chosen", 3)]
    top = select(CLUSTER_U, CLUSTERS, 2, "uncertainty")
    assert top.chosen == [0, 1]
    assert top.value == pytest.approx(3) == representativeness(CLUSTERS, [0, 1])
    assert top.gains[0] == pytest.approx(3) and top.gains[1] == pytest.approx(0)


def test_greedy_with_graded_similarities_by_hand():
    # f0 = (1, 0), f1 = (0.6, 0.8), f2 = (0, 1): cos 0-1 = 0.6, 0-2 = 0, 1-2 = 0.8.
    feats = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    u = np.array([0.5, 0.4, 0.3])
    np.testing.assert_allclose(cosine_similarity(feats, feats), [[1, 0.6, 0], [0.6, 1, 0.8], [0, 0.8, 1]], atol=1e-12)
    # all three candidates: gains 1 + 0.6 + 0 = 1.6, 0.6 + 1 + 0.8 = 2.4, 0 + 0.8 + 1 = 1.8 -> scan 1
    # (the middle one, though the least uncertain but one); cover (0.6, 1, 0.8); then scan 0 adds
    # 0.4, scan 2 adds 0.2 -> scan 0; F = 1 + 1 + 0.8 = 2.8.
    sel = select(u, feats, 2, candidates_factor=1.5)
    assert sel.candidates == [0, 1, 2] and sel.chosen == [1, 0]
    assert sel.gains == pytest.approx([0.4, 2.4, 0.2])
    assert sel.value == pytest.approx(2.8)


def test_only_the_most_uncertain_are_candidates():
    feats = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    u = np.array([0.5, 0.4, 0.3])
    assert select(u, feats, 1, candidates_factor=3).chosen == [1]   # K = 3: the most representative
    assert select(u, feats, 1, candidates_factor=2).chosen == [1]   # K = 2: scans 0 and 1; 2.4 > 1.6
    only = select(u, feats, 1, candidates_factor=1)                 # K = 1: scan 0 alone
    assert only.candidates == [0] and only.chosen == [0]
    # the most representative scan of the clusters (A) left out of the candidates
    sel = select(np.array([0.1, 0.2, 0.3, 0.9, 0.8]), CLUSTERS, 1, candidates_factor=2)
    assert sel.candidates == [3, 4] and sel.chosen == [3]
    assert select(np.array([0.1, 0.2, 0.3, 0.9, 0.8]), CLUSTERS, 1, candidates_factor=5).chosen == [2]
    # K = ceil(factor * n), at least n, at most the pool
    assert len(select(CLUSTER_U, CLUSTERS, 2, candidates_factor=1.5).candidates) == 3
    assert len(select(CLUSTER_U, CLUSTERS, 3, candidates_factor=4).candidates) == 5


def test_annotated_scans_count_as_covered():
    # without annotations: scan 0 (covers A); with a scan like A already annotated, A is covered
    # and the pick moves to cluster B (scan 3, gain 2), though 0 and 1 are more uncertain.
    assert select(CLUSTER_U, CLUSTERS, 1, candidates_factor=3).chosen == [0]
    sel = select(CLUSTER_U, CLUSTERS, 1, annotated_features=np.array([[2.0, 0, 0]]), candidates_factor=3)
    assert sel.chosen == [3]
    assert sel.gains[3] == pytest.approx(2) and sel.gains[0] == pytest.approx(0)
    assert sel.covered_by[:3] == [("annotated", 0)] * 3 and sel.covered_by[4] == ("chosen", 3)
    assert sel.value == pytest.approx(5)
    # both clusters annotated: nothing adds; the most uncertain candidate is taken
    both = select(CLUSTER_U, CLUSTERS, 1, annotated_features=np.eye(3)[:2], candidates_factor=3)
    assert both.chosen == [0] and both.gains[0] == pytest.approx(0)


def test_greedy_is_near_the_best_set():
    # F is monotone submodular: the greedy set is within 1 - 1/e of the best (here usually equal).
    rng = np.random.default_rng(7)
    for trial in range(20):
        feats = np.abs(rng.normal(size=(7, 4)))
        u = rng.random(7)
        sel = select(u, feats, 3, candidates_factor=3)
        best = max(representativeness(feats, s) for s in itertools.combinations(sel.candidates, 3))
        assert sel.value == pytest.approx(representativeness(feats, sel.chosen))
        assert sel.value >= (1 - 1 / math.e) * best - 1e-12
        first = max(sel.candidates, key=lambda c: (representativeness(feats, [c]), u[c]))
        assert sel.chosen[0] == first


def test_random_is_seeded_and_uncertainty_is_top_n():
    u = np.linspace(0, 1, 20)
    a = select(u, None, 4, "random", rng=np.random.default_rng(3))
    b = select(u, None, 4, "random", rng=np.random.default_rng(3))
    assert a.chosen == b.chosen and a.order == b.order
    assert a.chosen == [int(i) for i in np.random.default_rng(3).permutation(20)[:4]]
    assert sorted(a.order) == list(range(20)) and len(set(a.chosen)) == 4
    assert any(select(u, None, 4, "random", rng=np.random.default_rng(s)).chosen != a.chosen for s in range(4, 8))
    assert select(u, None, 4, "random").chosen == select(u, None, 4, "random").chosen  # default seed 0
    top = select(np.array([0.2, 0.9, 0.9, 0.1, 0.5]), None, 3, "uncertainty")
    assert top.chosen == [1, 2, 4] and top.order == [1, 2, 4, 0, 3]   # ties: the earlier scan first
    assert top.uncertainty_rank == [4, 1, 2, 5, 3]
    assert np.isnan(top.gains).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "at least 1"),
    (dict(n=6), "only 5"),
    (dict(n=2.0), "must be an integer"),
    (dict(strategy="entropy"), "unknown strategy 'entropy'"),
    (dict(uncertainty=np.zeros(4)), "5 feature vectors"),
    (dict(uncertainty=np.array([0.1, np.nan, 0, 0, 0])), "NaN"),
    (dict(uncertainty=None), "needs one uncertainty"),
    (dict(features=None), "needs one feature vector"),
    (dict(annotated_features=np.ones((1, 2))), "do not match"),
    (dict(candidates_factor=0.5), "at least 1"),
    (dict(uncertainty=np.zeros((5, 1))), "one value per scan"),
])
def test_select_refuses_bad_input(kwargs, message):
    args = dict(uncertainty=CLUSTER_U, features=CLUSTERS, n=2, strategy="suggestive")
    args.update(kwargs)
    with pytest.raises(SuggestionError, match=message):
        select(**args)


def test_select_refuses_an_empty_pool():
    with pytest.raises(SuggestionError, match="pool of unlabelled scans is empty"):
        select(np.zeros(0), np.zeros((0, 3)), 1)
    assert set(STRATEGIES) == {"suggestive", "uncertainty", "random"}


# --------------------------------------------------------------------------- uncertainty, by hand


def test_scan_uncertainty_by_hand():
    # 2 classes, 4 voxels in a row, foreground p = 0.6, 0.8, 0.1, 0 -> predicted at voxels 0 and 1;
    # region (predicted or p >= 0.25, no margin) = voxels 0, 1.  Normalised entropy (log 2):
    # H(0.6) = 0.97095, H(0.8) = 0.72193 -> mean 0.84644.  Expected Dice: TP = 0.6 + 0.8 = 1.4,
    # N = 2, G = 0.6 + 0.8 + 0.1 = 1.5 -> 2.8 / 3.5 = 0.8.  u = (0.84644 + 0.2) / 2 = 0.52322.
    fg = np.array([0.6, 0.8, 0.1, 0.0]).reshape(1, 1, 4)
    probs = np.stack([1 - fg, fg])
    assert expected_dice(probs)[1] == pytest.approx(0.8)
    s = scan_uncertainty(probs, ["bg", "fg"], margin=0)
    assert s.per_class["fg"]["entropy"] == pytest.approx(0.846441, abs=1e-5)
    assert s.per_class["fg"]["estimated_dice"] == pytest.approx(0.8)
    assert s.score == pytest.approx(0.523220, abs=1e-5)
    # with the estimate given (e.g. the card's calibrated one) it replaces the plain one
    assert scan_uncertainty(probs, ["bg", "fg"], margin=0, estimated_dice=[None, 0.5]).score == pytest.approx(
        (0.846441 + 0.5) / 2, abs=1e-5)
    # a margin of 1 adds voxel 2 (H(0.1) = 0.46900): mean (0.97095 + 0.72193 + 0.46900) / 3
    assert scan_uncertainty(probs, ["bg", "fg"], margin=1).per_class["fg"]["entropy"] == pytest.approx(
        0.720627, abs=1e-5)
    # a class the model considers nowhere counts 0; one it considers (p >= 0.25) but never predicts
    # counts its entropy alone
    none = np.stack([np.ones((1, 1, 4)) * 0.9, np.ones((1, 1, 4)) * 0.1])
    assert scan_uncertainty(none, margin=0).score == 0.0
    some = np.stack([np.full((1, 1, 4), 0.7), np.array([0.3, 0, 0, 0]).reshape(1, 1, 4)])
    some[0, 0, 0, 1:] = 1.0
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3)) / math.log(2)
    assert scan_uncertainty(some, margin=0).score == pytest.approx(h, abs=1e-5)


def _maps(bead_p: float, ball_edge_p: float = 0.998, shape=(14, 14, 14)):
    """Probabilities (bg, Ball, Bead): confident background (0.998), a 6^3 Ball whose outer shell has
    p_Ball = ``ball_edge_p`` (the rest of it 0.998), a 2^3 Bead at p_Bead = ``bead_p`` (the rest background)."""
    p = np.zeros((3,) + shape, np.float32)
    p[0], p[1], p[2] = 0.998, 0.001, 0.001
    p[:, 2:8, 2:8, 2:8] = np.array([1 - ball_edge_p, ball_edge_p, 0.0], np.float32)[:, None, None, None]
    p[:, 3:7, 3:7, 3:7] = np.array([0.001, 0.998, 0.001], np.float32)[:, None, None, None]
    p[:, 10:12, 10:12, 10:12] = np.array([0.999 - bead_p, 0.001, bead_p], np.float32)[:, None, None, None]
    return p


def test_an_uncertain_small_class_outranks_a_large_uncertain_background_share():
    unsure = scan_uncertainty(_maps(0.5), NAMES)        # the Bead at 0.5
    sure = scan_uncertainty(_maps(0.99), NAMES)         # the Bead at 0.99
    assert unsure.score > sure.score
    assert unsure.per_class["Bead"]["score"] > 2 * sure.per_class["Bead"]["score"]
    assert unsure.per_class["Ball"]["score"] == pytest.approx(sure.per_class["Ball"]["score"], abs=1e-6)
    # the Ball's 152-voxel shell at 0.6 holds far more entropy than the 8 uncertain Bead voxels, so a
    # voxel average would rank it first; per class, the small class's doubt counts as much
    shell = scan_uncertainty(_maps(0.99, ball_edge_p=0.6), NAMES)
    from imbalanceseglib.inference import normalised_entropy
    assert normalised_entropy(_maps(0.99, 0.6)).mean() > 2 * normalised_entropy(_maps(0.5)).mean()
    assert unsure.score > shell.score
    # weighting: the Bead alone
    assert scan_uncertainty(_maps(0.5), NAMES, class_weights={"Bead": 1.0}).score == pytest.approx(
        unsure.per_class["Bead"]["score"])
    with pytest.raises(SuggestionError, match="unknown classes"):
        scan_uncertainty(_maps(0.5), NAMES, class_weights={"Tumour": 1.0})
    with pytest.raises(SuggestionError, match="3 class names for 2"):
        scan_uncertainty(_maps(0.5)[:2], NAMES)


# --------------------------------------------------------------------------- descriptors and the whole step


def _bundle(tmp_path, arch="UNet3D", members=None):
    torch.manual_seed(0)
    params = {"in_channels": 1, "out_channels": 3, "features": [4, 8]}
    if members:
        params["members"] = members
    net = build_network(arch, params).eval()
    card = {"name": "t", "network": {"arch": arch, "params": params},
            "classes": [{"value": i, "name": n, "color": [0, 0, 0]} for i, n in enumerate(NAMES)],
            "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "percentile_zscore"}}}
    return load_bundle(save_bundle(tmp_path / f"{arch}.imbseg", card, net))


def _image(seed, shape=(16, 16, 16)):
    from libtest_helpers import sphere_case
    img, _ = sphere_case(seed, shape=shape)
    return sitk.GetImageFromArray(img)


def test_descriptor_is_the_pooled_deepest_encoder_level(tmp_path):
    bundle = _bundle(tmp_path)
    a = scan_features(_image(0), bundle)
    assert a.shape == (8,)                                          # the deepest level's width
    np.testing.assert_array_equal(a, scan_features(_image(0), bundle))   # identical scans
    assert not np.allclose(a, scan_features(_image(1), bundle))
    # by hand: one window (16^3), the encoders in turn, the spatial mean
    vol = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(vol)[None, None]
        for enc in bundle.network.encoders:
            x = enc(x)
    np.testing.assert_allclose(encoder_features(bundle.network, vol, [16, 16, 16]), x.mean((2, 3, 4))[0].numpy(),
                               rtol=1e-5, atol=1e-6)
    # 20 voxels along z: windows at 0 and 4, averaged; 10 along x: zero-padded 3 + 3 around it
    big = np.random.default_rng(1).normal(size=(20, 16, 10)).astype(np.float32)
    padded = np.pad(big, [(0, 0), (0, 0), (3, 3)])
    want = np.mean([encoder_features(bundle.network, padded[s:s + 16], [16, 16, 16]) for s in (0, 4)], axis=0)
    np.testing.assert_allclose(encoder_features(bundle.network, big, [16, 16, 16]), want, rtol=1e-5, atol=1e-7)
    # after the card's preprocessing: the same scan stored with its x axis mirrored is the same scan
    arr = sitk.GetArrayFromImage(_image(0))
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, :, ::-1]))
    mirrored.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    mirrored.SetOrigin((15.0, 0.0, 0.0))
    np.testing.assert_allclose(scan_features(mirrored, bundle), a, rtol=1e-5, atol=1e-7)
    ens = _bundle(tmp_path, "UNet3DEnsemble", members=2)
    assert scan_features(_image(0), ens).shape == (16,)


def test_rank_for_annotation_end_to_end(tmp_path):
    bundle = _bundle(tmp_path)
    pool = {"a": _image(0), "a_copy": _image(0), "b": _image(1), "c": _image(2)}
    seen = []
    rows = rank_for_annotation(bundle, pool, 2, progress=lambda stage, f: seen.append((stage, f)))
    assert [r.rank for r in rows] == [1, 2, 3, 4]
    assert sorted(r.name for r in rows) == sorted(pool)
    assert [r.chosen for r in rows] == [True, True, False, False]
    assert not {"a", "a_copy"} <= {r.name for r in rows if r.chosen}   # a scan and its copy: one of them
    for r in rows:
        assert 0.0 <= r.uncertainty <= 1.0 and r.gain is not None and r.gain >= 0 and r.reason
        assert set(r.per_class) == {"Ball", "Bead"}
    assert rows[0].reason.startswith("chosen (1st pick)")
    assert seen[-1] == ("select", 1.0) and all(0 < f <= 1 for _, f in seen)
    u = {r.name: r.uncertainty for r in rows}
    assert u["a"] == pytest.approx(u["a_copy"])
    # the uncertainty strategy: the two most uncertain, no descriptors; each prediction handed on
    preds = {}
    top = rank_for_annotation(bundle, pool, 2, strategy="uncertainty", on_prediction=preds.__setitem__)
    assert sorted(preds) == sorted(pool) and preds["b"].labels.shape == (16, 16, 16)
    ranked = sorted(u.items(), key=lambda kv: -kv[1])
    assert {r.name for r in top if r.chosen} == {n for n, _ in ranked[:2]}
    assert all(r.gain is None for r in top)
    # random: seeded, no network
    r1 = rank_for_annotation(bundle, pool, 2, strategy="random", seed=5)
    assert [r.name for r in r1] == [r.name for r in rank_for_annotation(bundle, pool, 2, strategy="random", seed=5)]
    assert all(r.uncertainty is None for r in r1)
    rank_for_annotation(bundle, pool, 2, strategy="random", on_prediction=lambda *a: pytest.fail("no network"))
    # an annotated scan identical to a pool scan covers it: the copy of "a" is not picked
    rows = rank_for_annotation(bundle, {"a_copy": _image(0), "b": _image(1), "c": _image(2)}, 1,
                               annotated={"a": _image(0)}, candidates_factor=3)
    by_name = {r.name: r for r in rows}
    assert by_name["a_copy"].gain == pytest.approx(0, abs=1e-9) and not by_name["a_copy"].chosen
    assert by_name["a_copy"].similar_to == "a" and by_name["a_copy"].similarity == pytest.approx(1)


def test_rank_for_annotation_refuses_bad_input(tmp_path):
    bundle = _bundle(tmp_path)
    pool = {"a": _image(0), "b": _image(1)}
    with pytest.raises(SuggestionError, match="at least 1"):
        rank_for_annotation(bundle, pool, 0)
    with pytest.raises(SuggestionError, match="only 2"):
        rank_for_annotation(bundle, pool, 3)
    with pytest.raises(SuggestionError, match="empty"):
        rank_for_annotation(bundle, {}, 1)
    with pytest.raises(SuggestionError, match="unknown strategy"):
        rank_for_annotation(bundle, pool, 1, strategy="coreset")
    flat = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
    with pytest.raises(ImageError, match="scan 'slice' is 2-D"):
        rank_for_annotation(bundle, {**pool, "slice": flat}, 1)
    with pytest.raises(ImageError, match="annotated scan 'old' is 2-D"):
        rank_for_annotation(bundle, pool, 1, annotated={"old": flat})
    with pytest.raises(SuggestionError, match=r"\['a'\] are both annotated"):
        rank_for_annotation(bundle, pool, 1, annotated={"a": _image(0)})
    with pytest.raises(SuggestionError, match="not a SimpleITK image"):
        rank_for_annotation(bundle, {"a": np.zeros((4, 4, 4))}, 1)
