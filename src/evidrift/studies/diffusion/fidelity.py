"""Fidelity without downloads (ARCHITECTURE §11): features of a classifier trained in the run on phantoms.

- ``train_feature_classifier``: a ``SmallImageEncoder`` with a 5-class head trained with cross-entropy on
  the real fine-tune images; its ``dim``-wide embedding is the feature space (the analogue of the
  chest-X-ray DenseNet features of chest-distillation's ``xrv_fid``).
- ``frechet_distance``: ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (``scipy.linalg.sqrtm``, imaginary
  parts from round-off dropped; covariances with ddof 1, as pytorch-fid / torch-fidelity).
- ``kernel_inception_distance``: unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³,
  averaged over ``subsets`` random subsets of ``subset_size`` (torch-fidelity's KID convention).
- ``frechet_bootstrap_ci``: percentile CI of the FD over resamples of the generated features.
- ``real_floor``: the same distances between two disjoint halves of the real set: the value a perfect
  generator would get at that sample size.
- ``ssim_diversity``: mean pairwise SSIM (``evidrift.metrics.drift.ssim``: Gaussian-window SSIM on min-max
  normalized images) among samples of one prompt class; lower = more diverse (the reference's MS-SSIM
  diversity; single-scale here because 32 px images are too small for five scales).
- ``inception_features``: standard 2048-d pool features of torchvision's InceptionV3 from a local weights
  file (images resized to 299 px bilinearly, gray replicated to RGB, ImageNet normalization); only when
  ``fidelity.inception_weights`` is set.
"""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor

from evidrift.metrics.drift import ssim
from evidrift.studies.diffusion.models import SmallImageEncoder


def train_feature_classifier(
    images: Tensor, labels: Tensor, classes: int, steps: int, seed: int, batch_size: int = 32, dim: int = 64
) -> SmallImageEncoder:
    """Train on ``images`` [N, 1, S, S] in [-1, 1] with int64 ``labels`` [N]; returned in eval mode."""
    torch.manual_seed(seed)
    model = SmallImageEncoder(dim, classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randperm(images.shape[0], generator=generator)[:batch_size]
        loss = F.cross_entropy(model.logits(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def features(model: SmallImageEncoder, images: Tensor) -> np.ndarray:
    """float64 [N, dim] embeddings of ``images`` [N, 1, S, S] in [-1, 1]."""
    return torch.relu(model(images)).double().numpy()


@torch.no_grad()
def predictions(model: SmallImageEncoder, images: Tensor) -> np.ndarray:
    """int64 [N] predicted classes."""
    return model.logits(images).argmax(dim=1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, d] and b [M, d] (N, M ≥ 2)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular covariances are expected (dead ReLU features, few samples)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # the pytorch-fid fallback: add eps to the diagonals
            offset = np.eye(cov_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def frechet_bootstrap_ci(
    generated: np.ndarray, real: np.ndarray, n_boot: int, seed: int = 0, ci: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the Fréchet distance over resamples (with replacement) of the generated
    features, the real features fixed: the spread from the finite generated sample. Resampling with
    replacement repeats samples, which biases FD upwards, so the interval can sit above the point estimate;
    compare models by their intervals, not the estimate against its own interval."""
    rng = np.random.default_rng(seed)
    n = generated.shape[0]
    values = [frechet_distance(generated[rng.integers(0, n, n)], real) for _ in range(max(1, n_boot))]
    low, high = np.quantile(values, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(low), float(high)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subset_size: int, subsets: int = 20, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over random subsets of both sets."""
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(
            a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def real_floor(real: np.ndarray, n: int, subset_size: int, seed: int = 0) -> dict[str, float]:
    """FD and KID between two disjoint random subsets of min(n, N // 2) of the real features [N, d] (``n``:
    the generated sample count, so that the floor has the generated sets' sample-size bias)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(real.shape[0])
    half = min(n, real.shape[0] // 2)
    a, b = real[order[:half]], real[order[half : 2 * half]]
    kid, kid_std = kernel_inception_distance(a, b, subset_size, seed=seed)
    return {"fd": frechet_distance(a, b), "kid": kid, "kid_std": kid_std}


def ssim_diversity(images: Tensor) -> float:
    """Mean SSIM over all pairs of ``images`` [N, S, S] (N ≥ 2, S ≥ 11); NaN below two images."""
    pairs = list(itertools.combinations(range(images.shape[0]), 2))
    if not pairs:
        return float("nan")
    a = images[[i for i, _ in pairs]]
    b = images[[j for _, j in pairs]]
    return float(np.nanmean(ssim(a, b).numpy()))


@torch.no_grad()
def inception_features(weights: str | os.PathLike[str], images: Tensor, batch_size: int = 16) -> np.ndarray:
    """2048-d pool features float64 [N, 2048] of ``images`` [N, S, S] in [0, 1] with torchvision's
    ``inception_v3`` loaded from a local state-dict file (``weights_only=True``)."""
    from torchvision.models import inception_v3  # type: ignore[import-untyped]  # torchvision has no py.typed

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size, None].float().repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(model((x - mean) / std).double().numpy())
    return np.concatenate(out)
