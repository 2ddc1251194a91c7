"""Stage-4 building blocks against ground truths: HF hidden states, brute-force k-center and
nearest neighbours, numpy statistics; the representation cache key and bad hook names."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lib.core.files_and_cache import ArtifactError
from lib.pipeline.cli import UsageError
from lib.sampling.spectral import (ASSIGNMENT_LABELS, REPS_CACHE_NAMESPACE, RepresentationSettings,
                                   compute_representations, cover_stats, distance_summary,
                                   greedy_farthest_first_cover, kcenter_farthest_first, l2_normalize_rows,
                                   model_identity, nearest_targets, representation_cache_key,
                                   sample_len_tolerant_pairs, select_from_global_clusters, select_random,
                                   spectral_embedding, token_lengths, tokenize_for_representations)

PROMPTS = ["3+5=8\n9-4=", "12*7=", "What is 17 plus 26?", "8/2=4\n6*7=42\n9-14=", "1+1="]


def _hf_hidden(model, prompt: str) -> tuple:
    """HF hidden states of one unpadded prompt (embeddings, block outputs…, final-norm output)."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.hf_model(ids, output_hidden_states=True)
    return out.hidden_states, out.logits


# ---------------------------------------------------------------------------------------------
# Representations (real model)


def test_hook_normalized_last_equals_hf_final_norm_state(smollm2):
    """`ln_final.hook_normalized` is x/rms before the RMSNorm gain: times the gain it is HF's last hidden state."""
    reps = compute_representations(smollm2, PROMPTS, RepresentationSettings("hidden", "ln_final.hook_normalized", "last"),
                                   batch_size=2, cache_dir=None, progress=False)
    out = compute_representations(smollm2, PROMPTS, RepresentationSettings("hidden", "ln_final.hook_out", "last"),
                                  batch_size=3, cache_dir=None, progress=False)
    gain = smollm2.hf_model.model.norm.weight.detach().float().numpy()
    for i, p in enumerate(PROMPTS):
        hs, _ = _hf_hidden(smollm2, p)
        # transformers puts the final-norm output (with gain) as the last entry of hidden_states
        truth = hs[-1][0, -1].float().numpy()
        np.testing.assert_allclose(out[i], truth, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(reps[i] * gain, truth, rtol=1e-4, atol=1e-4)
    assert reps.dtype == np.float32 and reps.shape == (len(PROMPTS), smollm2.d_model)


def test_mean_pooling_in_padded_batches_equals_unpadded_hf(smollm2):
    """Mean over real tokens of a mid-layer residual, computed in right-padded batches."""
    reps = compute_representations(smollm2, PROMPTS, RepresentationSettings("hidden", "blocks.5.hook_resid_post", "mean"),
                                   batch_size=4, progress=False)
    for i, p in enumerate(PROMPTS):
        hs, _ = _hf_hidden(smollm2, p)
        np.testing.assert_allclose(reps[i], hs[6][0].float().mean(0).numpy(), rtol=1e-4, atol=1e-4)


FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
FEW_SHOT_PROMPTS = [FEW_SHOT + q for q in ("12+7=", "4*6=", "25-3=", "9+9=", "14/2=", "2+28=", "100-1=")]


@pytest.mark.parametrize("hook,pooling", [("ln_final.hook_normalized", "last"), ("blocks.5.hook_resid_post", "mean")])
def test_shared_prefix_gives_the_vectors_of_whole_prompts(smollm2, monkeypatch, hook, pooling):
    """A few-shot block common to every prompt runs once; the pooled vectors (last token, or mean
    over every token, prefix included) equal those of running each prompt whole."""
    import lib.sampling.spectral as ss

    settings = RepresentationSettings("hidden", hook, pooling)
    seen = []
    real = ss._forward_batch
    monkeypatch.setattr(ss, "_forward_batch", lambda m, rows, s, p=None: seen.append(p) or real(m, rows, s, p))
    shared = compute_representations(smollm2, FEW_SHOT_PROMPTS, settings, batch_size=3, progress=False)
    assert seen and all(p is not None and p.length >= len(smollm2.tokenizer(FEW_SHOT)["input_ids"]) - 1 for p in seen)
    whole = compute_representations(smollm2, FEW_SHOT_PROMPTS, settings, batch_size=3, progress=False,
                                    share_prefix=False)
    assert seen[-1] is None
    np.testing.assert_allclose(shared, whole, rtol=1e-4, atol=1e-4)
    hs, _ = _hf_hidden(smollm2, FEW_SHOT_PROMPTS[0])
    if pooling == "mean":
        np.testing.assert_allclose(shared[0], hs[6][0].float().mean(0).numpy(), rtol=1e-4, atol=1e-4)


def test_logits_space_and_left_truncation(smollm2):
    reps = compute_representations(smollm2, PROMPTS[:3], RepresentationSettings("logits", "ignored", "last", 3),
                                   batch_size=3, progress=False)
    for i, p in enumerate(PROMPTS[:3]):
        ids = torch.tensor([smollm2.tokenizer(p)["input_ids"][-3:]])
        with torch.inference_mode():
            truth = smollm2.hf_model(ids).logits[0, -1].float().numpy()
        np.testing.assert_allclose(reps[i], truth, rtol=1e-4, atol=1e-3)
    assert reps.shape[1] == smollm2.hf_model.config.vocab_size


def test_cache_reuses_vectors_and_hook_changes_key(smollm2, tmp_path, monkeypatch):
    import lib.sampling.spectral as ss

    a = RepresentationSettings("hidden", "ln_final.hook_normalized", "last")
    b = RepresentationSettings("hidden", "blocks.10.hook_resid_post", "last")
    first = compute_representations(smollm2, PROMPTS[:3], a, batch_size=8, cache_dir=str(tmp_path), progress=False)
    files = list((tmp_path / REPS_CACHE_NAMESPACE).rglob("*.pkl"))
    assert len(files) == 3

    def boom(*_a, **_k):
        raise AssertionError("a cached prompt was recomputed")

    # only the missing prompt is computed; the three cached ones come from disk
    calls = []
    real = ss._forward_batch
    monkeypatch.setattr(ss, "_forward_batch", lambda m, rows, s, *a: calls.append(len(rows)) or real(m, rows, s, *a))
    again = compute_representations(smollm2, PROMPTS[:4], a, batch_size=8, cache_dir=str(tmp_path), progress=False)
    assert calls == [1]
    np.testing.assert_array_equal(again[:3], first)
    monkeypatch.setattr(ss, "_forward_batch", boom)
    compute_representations(smollm2, PROMPTS[:4], a, batch_size=8, cache_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(ss, "_forward_batch", real)

    ident = model_identity(smollm2)
    assert representation_cache_key(ident, a, PROMPTS[0]) != representation_cache_key(ident, b, PROMPTS[0])
    other = compute_representations(smollm2, PROMPTS[:3], b, batch_size=8, cache_dir=str(tmp_path), progress=False)
    assert not np.allclose(other, first)
    assert len(list((tmp_path / REPS_CACHE_NAMESPACE).rglob("*.pkl"))) == 4 + 3


def test_cache_key_covers_every_setting(smollm2):
    ident = model_identity(smollm2)
    base = RepresentationSettings("hidden", "ln_final.hook_normalized", "mean", None)
    variants = [RepresentationSettings("logits", "ln_final.hook_normalized", "mean", None),
                RepresentationSettings("hidden", "ln_final.hook_out", "mean", None),
                RepresentationSettings("hidden", "ln_final.hook_normalized", "last", None),
                RepresentationSettings("hidden", "ln_final.hook_normalized", "mean", 8)]
    k0 = representation_cache_key(ident, base, "p")
    keys = {representation_cache_key(ident, v, "p") for v in variants}
    assert k0 not in keys and len(keys) == len(variants)
    assert representation_cache_key({**ident, "ai_model": "other"}, base, "p") != k0
    assert representation_cache_key({**ident, "dtype": "torch.bfloat16"}, base, "p") != k0
    assert representation_cache_key(ident, base, "q") != k0
    # the hook is irrelevant in the logits space
    lg = RepresentationSettings("logits", "a", "mean"), RepresentationSettings("logits", "b", "mean")
    assert representation_cache_key(ident, lg[0], "p") == representation_cache_key(ident, lg[1], "p")


def test_unknown_hook_name_lists_valid_names(smollm2):
    with pytest.raises(UsageError) as exc:
        compute_representations(smollm2, PROMPTS[:1], RepresentationSettings("hidden", "ln_final.hook_normalised", "last"),
                                progress=False)
    msg = str(exc.value)
    assert "--rep_hook_name 'ln_final.hook_normalised'" in msg and "ln_final.hook_normalized" in msg


def test_tokenization_lengths_and_empty_prompt(smollm2):
    rows = tokenize_for_representations(smollm2.tokenizer, ["12+34="], 2)
    assert rows == [smollm2.tokenizer("12+34=")["input_ids"][-2:]]
    with pytest.raises(ArtifactError, match="no tokens"):
        tokenize_for_representations(smollm2.tokenizer, [""], None)
    lens = token_lengths(smollm2.tokenizer, ["1+1=", "12+34="])
    assert lens.tolist() == [len(smollm2.tokenizer("1+1=", add_special_tokens=False)["input_ids"]),
                             len(smollm2.tokenizer("12+34=", add_special_tokens=False)["input_ids"])]
    assert token_lengths(None, ["a b c", "d"]).tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------
# Spectral embedding and k-center


def test_spectral_embedding_is_centred_pca_on_the_unit_sphere():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 12)) @ rng.normal(size=(12, 12)) + 5.0
    Z = spectral_embedding(X, 4)
    assert Z.shape == (50, 4) and Z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
    # same directions as the top-4 principal components of the centred data
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    Y = Xc @ vt[:4].T
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    signs = np.sign((Z * Yn).sum(0))  # PCA fixes each component's sign by its own convention
    np.testing.assert_allclose(Z, Yn * signs, atol=1e-5)
    assert spectral_embedding(X, 100).shape == (50, 12)
    zero = l2_normalize_rows(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(zero, [[0.0, 0.0], [0.6, 0.8]])


def _radius(X: np.ndarray, centers) -> float:
    d = np.linalg.norm(X[:, None, :] - X[None, list(centers), :], axis=2)
    return float(d.min(1).max())


@pytest.mark.parametrize("seed", range(6))
def test_kcenter_is_a_2_approximation_of_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(c, 0.3, size=(4, 2)) for c in ((0, 0), (4, 1), (1, 5))])
    X = np.concatenate([X, rng.uniform(-2, 6, size=(3, 2))])
    K = 3
    opt = min(_radius(X, c) for c in itertools.combinations(range(len(X)), K))
    res = kcenter_farthest_first(X, K, np.random.default_rng(seed))
    assert len(set(res.center_indices.tolist())) == K
    assert res.radius == pytest.approx(_radius(X, res.center_indices), abs=1e-9)
    assert res.radius <= 2 * opt + 1e-9
    # assignment = nearest center, squared distances never negative (spec note 11)
    d = np.linalg.norm(X[:, None] - X[None, res.center_indices], axis=2)
    np.testing.assert_allclose(np.sqrt(res.nn_dist2), d.min(1), atol=1e-9)
    assert (res.nn_dist2 >= 0).all()
    meta = res.meta()
    assert meta["method"] == "kcenter_farthest_first" and sum(meta["cluster_sizes"]) == len(X)


def test_kcenter_duplicates_and_clamping():
    X = np.ones((5, 3)) / np.sqrt(3)
    res = kcenter_farthest_first(X, 10, np.random.default_rng(1))
    assert len(res.center_indices) == 5 and len(set(res.center_indices.tolist())) == 5
    assert np.isfinite(res.meta()["achieved_cover_radius_l2"]) and res.radius == 0.0


def test_global_cluster_pick_takes_medoids_of_largest_clusters_then_fills():
    rng = np.random.default_rng(3)
    Z = l2_normalize_rows(rng.normal(size=(60, 4)))
    clusters = kcenter_farthest_first(Z, 6, np.random.default_rng(0))
    group = np.arange(0, 60, 2)
    picked, meta = select_from_global_clusters(group, 10, clusters, Z, np.random.default_rng(0))
    assert len(picked) == 10 == len(set(picked)) and set(picked) <= set(group.tolist())
    labels = clusters.assignment[group]
    uniq, counts = np.unique(labels, return_counts=True)
    assert meta == {"status": "ok", "n_selected": 10, "n_group": 30, "n_clusters_in_group": len(uniq),
                    "strategy": "1_per_cluster_medoid_then_fill"}
    for c, p in zip(uniq[np.argsort(-counts, kind="stable")], picked):
        members = group[labels == c]
        d = np.linalg.norm(Z[members] - Z[clusters.center_indices[c]], axis=1)
        assert p == members[np.argmin(d)]
    allp, meta_all = select_from_global_clusters(group[:5], 5, clusters, Z, np.random.default_rng(0))
    assert allp == group[:5].tolist() and meta_all == {"status": "all", "n_selected": 5}
    assert select_from_global_clusters([], 3, clusters, Z, np.random.default_rng(0)) == ([], {"status": "empty"})


def test_greedy_cover_is_farthest_first_and_returns_exactly_n():
    rng = np.random.default_rng(5)
    Z = l2_normalize_rows(rng.normal(size=(40, 3)))
    group = np.arange(5, 35)
    picked, meta = greedy_farthest_first_cover(Z, group, 0.5, 8, 8)
    assert len(picked) == 8 == len(set(picked)) and set(picked) <= set(group.tolist())
    for i in range(1, 8):  # each pick is the farthest remaining point from those before it
        rest = [g for g in group if g not in picked[:i]]
        d = np.linalg.norm(Z[rest][:, None] - Z[picked[:i]][None], axis=2).min(1)
        assert np.linalg.norm(Z[picked[i]] - Z[picked[:i]], axis=1).min() == pytest.approx(d.max())
    assert meta["stopped_reason"] in ("max_points_reached", "min_points_filled") and meta["n_available"] == 30
    _, meta_r = greedy_farthest_first_cover(Z, group, 5.0, 8, 8)  # radius covers everything at once
    assert meta_r["stopped_reason"] == "min_points_filled" and meta_r["n_selected_before_min_fill"] == 1
    small, meta_s = greedy_farthest_first_cover(Z, group[:4], 0.5, 8, 8)
    assert small == group[:4].tolist() and meta_s["stopped_reason"] == "all_points_selected_small_group"


def test_random_pick_is_seeded_and_in_group():
    a, meta = select_random(np.arange(10, 30), 7, np.random.default_rng(4))
    b, _ = select_random(np.arange(10, 30), 7, np.random.default_rng(4))
    assert a == b and len(set(a)) == 7 and all(10 <= i < 30 for i in a)
    assert meta == {"status": "random", "n_selected": 7, "n_group": 20}


# ---------------------------------------------------------------------------------------------
# Pairing and statistics


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "cityblock"])
def test_nearest_targets_match_brute_force(metric):
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(11)
    S, T = rng.normal(size=(13, 5)), rng.normal(size=(37, 5))
    sl, tl = rng.integers(3, 9, 13), rng.integers(3, 9, 37)
    sl[0] = 100  # no target within tolerance
    b_all, d_all, b_len, d_len = nearest_targets(S, T, sl, tl, 1, metric, chunk=5)
    D = cdist(S, T, metric=metric)
    np.testing.assert_array_equal(b_all, D.argmin(1))
    np.testing.assert_allclose(d_all, D.min(1), atol=1e-9)
    ok = np.abs(tl[None] - sl[:, None]) <= 1
    Dm = np.where(ok, D, np.inf)
    expect = np.where(ok.any(1), Dm.argmin(1), -1)
    np.testing.assert_array_equal(b_len, expect)
    assert b_len[0] == -1


def test_len_tolerant_pairs_prefer_length_matched_and_label_reuse():
    vectors = np.array([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [5.0, 0.0], [10.2, 0.0], [0.0, 0.3]])
    lengths = np.array([4, 4, 6, 4, 9, 4])
    # sources 0, 1, 5; targets 2 (near 0 but 2 tokens longer), 3 (length 4), 4 (near 1, length 9)
    src, tgt, meta = sample_len_tolerant_pairs([0, 1, 5], [2, 3, 4], vectors, lengths, 0, "euclidean",
                                               np.random.default_rng(0))
    assert src == [0, 1, 5] and tgt == [3, 3, 3]
    assert all(p["len_matched"] and abs(p["len_diff"]) == 0 for p in meta["pair_meta"])
    assert meta["unique_target_used"] == 1 and meta["target_reused_count"] == 2 and meta["len_matched_count"] == 3
    assert meta["assignment_pass_counts"] == {ASSIGNMENT_LABELS[1]: 1, ASSIGNMENT_LABELS[2]: 2,
                                              ASSIGNMENT_LABELS[3]: 0, ASSIGNMENT_LABELS[4]: 0}
    src, tgt, meta = sample_len_tolerant_pairs([0, 1], [2, 4], vectors, lengths, 0, "euclidean",
                                               np.random.default_rng(0))
    assert tgt == [2, 4] and not any(p["len_matched"] for p in meta["pair_meta"])
    assert [p["distance"] for p in meta["pair_meta"]] == pytest.approx([0.1, 0.2])
    _, tgt5, _ = sample_len_tolerant_pairs([0, 1], [2, 4], vectors, lengths, 5, "euclidean", np.random.default_rng(0))
    assert tgt5 == [2, 4]
    with pytest.raises(ValueError, match="cannot sample"):
        sample_len_tolerant_pairs([0], [2], vectors, lengths, 0, "cosine", np.random.default_rng(0), k=3)


def test_distance_summary_and_cover_stats():
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000)
    s = distance_summary(v, 0, rng)
    assert s["min"] == v.min() and s["max"] == v.max() and s["mean"] == pytest.approx(v.mean())
    assert s["p90"] == pytest.approx(np.percentile(v, 90)) and s["quantiles_approx"] is False
    approx = distance_summary(v, 100, rng)
    assert approx["quantiles_approx"] is True and approx["quantiles_sample_size"] == 100
    assert approx["std"] == pytest.approx(v.std())
    assert distance_summary([], 10, rng) == {}

    Z = l2_normalize_rows(np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, 0]], dtype=float))
    st = cover_stats(Z, [0, 1, 2, 3, 4], [0, 2], 0.2, 2, 0, rng)
    assert st["status"] == "ok" and st["n_points"] == 5 and st["n_centers"] == 2
    assert st["coverage"] == {"n_covered": 4, "n_uncovered": 1, "fraction_covered": 0.8}
    assert st["clusters"]["n_nonempty"] == 2
    sizes = sorted(c["size"] for c in st["clusters"]["largest"])
    assert sizes == [2, 3]
    assert cover_stats(Z, [], [0], 0.2, 2, 0, rng)["status"] == "empty"
