"""The sample-quality metrics from Inception features, in numpy and scipy only: Fréchet Inception Distance,
Inception Score, and the improved precision/recall of Kynkäänniemi et al. (2019).

Each follows OpenAI's evaluator (guided-diffusion ``evaluations/evaluator.py``), which the VAR paper's
numbers come from:

- FID: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)`` on the 2048 pool features. The trace of the
  matrix square root is taken as the sum of the square roots of the eigenvalues of ``S1^1/2 S2 S1^1/2``
  (symmetric, so ``eigh`` applies; its eigenvalues are those of ``S1 S2``), which equals what
  ``scipy.linalg.sqrtm(S1 @ S2)`` gives and stays real and finite when the product is near singular.
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` on the softmax of the 1008 logits without the bias (the evaluator
  multiplies the pool features by the softmax layer's weights only), per split of 5,000 images, averaged.
- Precision/recall with k = 3: an image lies on the other set's manifold when its squared distance to some
  image of that set is at most that image's distance to its k-th nearest neighbour (itself at distance 0
  counted as the 0th). Precision: the share of samples on the reference manifold; recall: the share of
  reference images on the samples' manifold. Distances are computed as the evaluator does: in float16
  (float32 for a block where float16 overflows), in blocks of 10,000 x 10,000; in float16 distances tie
  more often, and ties count as inside.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from var_rt.errors import InputError

PR_K = 3  # nearest neighbours of the manifold estimate (OpenAI's evaluator, Kynkäänniemi et al.)
PR_BLOCK = 10_000  # rows and columns per distance block (the evaluator's; it decides where float32 is used)
IS_SPLIT = 5_000  # images per Inception Score split (the evaluator's: 10 splits of 50,000 samples)
FEATURE_DIM = 2048  # InceptionV3 pool features, what FID statistics are taken over


def check_stats(mu, sigma, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """FID statistics as float64 after checking them: mu of shape (D,), sigma (D, D), finite, symmetric and
    positive semi-definite (up to rounding). InputError otherwise, naming ``what``."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] == 0:
        raise InputError(f"{what}: mu has shape {mu.shape} and sigma {sigma.shape}; statistics need mu of shape "
                         f"(D,) and sigma (D, D), e.g. D = {FEATURE_DIM} for InceptionV3 pool features")
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise InputError(f"{what}: mu and sigma must be numbers, not {mu.dtype} / {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise InputError(f"{what}: {name} holds {int((~np.isfinite(a)).sum())} NaN or infinite value(s)")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise InputError(f"{what}: sigma is not symmetric, so it is not a covariance matrix")
    try:  # a covariance has no negative eigenvalue (rounding gives tiny ones); Cholesky is the quick test
        np.linalg.cholesky(sigma + 1e-6 * scale * np.eye(len(sigma)))
    except np.linalg.LinAlgError:
        lowest = float(np.linalg.eigvalsh(sigma)[0])
        raise InputError(f"{what}: sigma is not positive semi-definite (eigenvalue {lowest:.4g}), so it is not a "
                         f"covariance matrix") from None
    return mu, sigma


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, normalised by N - 1 like ``np.cov``) of (N, D) features, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"statistics need at least 2 feature vectors, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def centred_factor(features) -> np.ndarray:
    """A with ``A.T @ A`` = the features' covariance: the centred features over sqrt(N - 1), float64 (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    return (f - f.mean(axis=0)) / np.sqrt(len(f) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None) -> float:
    """FID between two Gaussians (their statistics already checked by check_stats, same D).

    ``factor1``: optionally A (N, D) with ``sigma1 = A.T @ A`` (centred_factor of the features). For N < D the
    trace is then taken on the N x N matrix ``A sigma2 A.T``, which has the same nonzero eigenvalues as
    ``sigma1 sigma2``: exact, and far cheaper than a D x D decomposition for small sets."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"statistics of different sizes cannot be compared: mu {mu1.shape} vs {mu2.shape}")
    if factor1 is not None:
        a = np.asarray(factor1, np.float64)
        inner = a @ sigma2 @ a.T
    else:
        root1 = _sqrt_psd(sigma1)
        inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(fid, 0.0)  # a set against itself: 0 up to rounding, never below


def inception_score(logits, split_size: int = IS_SPLIT) -> float:
    """Inception Score of (N, C) logits: exp of the mean KL divergence between each image's class
    distribution and the split's mean distribution, averaged over splits of ``split_size`` images."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"the Inception Score needs (N, C) logits with N >= 1, got shape {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))  # log softmax, no 0 * log 0
    scores = []
    for start in range(0, len(log_p), split_size):
        lp = log_p[start:start + split_size]
        p = np.exp(lp)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp((p * (lp - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores))


def pairwise_sq_distances(u, v) -> np.ndarray:
    """(len(u), len(v)) squared Euclidean distances, float32, computed as OpenAI's evaluator computes them:
    features rounded to float16, ``|u|^2 - 2 u.v + |v|^2`` with every intermediate rounded to float16
    (squares, the norms and the dot products summed in float32, as a GPU does), clipped at 0; where any
    distance of the block overflows float16, the block is computed in float32 instead."""
    f16, f32 = np.float16, np.float32
    u, v = np.asarray(u, f32), np.asarray(v, f32)
    u16, v16 = u.astype(f16).astype(f32), v.astype(f16).astype(f32)  # values exact in float32
    with np.errstate(over="ignore", invalid="ignore"):
        # Each operation in float32 and then rounded to float16 gives the float16 operation's result.
        nu = (u16 * u16).astype(f16).astype(f32).sum(axis=1).astype(f16).astype(f32)
        nv = (v16 * v16).astype(f16).astype(f32).sum(axis=1).astype(f16).astype(f32)
        two_dot = (2 * (u16 @ v16.T).astype(f16).astype(f32)).astype(f16).astype(f32)
        d = (nu[:, None] - two_dot).astype(f16).astype(f32)
        d = np.maximum((d + nv[None, :]).astype(f16).astype(f32), 0)
    if np.isfinite(d).all():
        return d
    return np.maximum((u * u).sum(axis=1)[:, None] - 2 * (u @ v.T) + (v * v).sum(axis=1)[None, :], 0).astype(f32)


def _check_count(features: np.ndarray, k: int, what: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or len(f) <= k:
        raise InputError(f"precision/recall need more than k = {k} images per set (each image's k-th nearest "
                         f"neighbour other than itself); {what} has {len(f)}")
    return f


def manifold_radii(features, k: int = PR_K, block: int = PR_BLOCK) -> np.ndarray:
    """Each feature vector's squared distance to its k-th nearest neighbour in the set (itself is the 0th)."""
    f = _check_count(features, k, "the set")
    radii = np.empty(len(f), np.float32)
    for a in range(0, len(f), block):
        rows = np.concatenate([pairwise_sq_distances(f[a:a + block], f[b:b + block])
                               for b in range(0, len(f), block)], axis=1)
        radii[a:a + block] = np.partition(rows, k, axis=1)[:, k]
    return radii


def precision_recall(ref_features, sample_features, k: int = PR_K, block: int = PR_BLOCK) -> Tuple[float, float]:
    """(precision, recall) of the samples against the reference set, k nearest neighbours."""
    ref = _check_count(ref_features, k, "the reference set")
    smp = _check_count(sample_features, k, "the sample set")
    if ref.shape[1] != smp.shape[1]:
        raise InputError(f"features of different sizes: {ref.shape[1]} vs {smp.shape[1]}")
    r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
    ref_inside = np.zeros(len(ref), bool)  # on the samples' manifold: recall
    smp_inside = np.zeros(len(smp), bool)  # on the reference manifold: precision
    for a in range(0, len(ref), block):
        for b in range(0, len(smp), block):
            d = pairwise_sq_distances(ref[a:a + block], smp[b:b + block])
            ref_inside[a:a + block] |= (d <= r_smp[None, b:b + block]).any(axis=1)
            smp_inside[b:b + block] |= (d <= r_ref[a:a + block, None]).any(axis=0)
    return float(smp_inside.mean()), float(ref_inside.mean())
