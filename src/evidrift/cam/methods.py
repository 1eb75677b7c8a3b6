"""CAM formulas: pure functions of a target layer's activations A and gradients G (ARCHITECTURE §5).

Every layer method takes ``A`` and ``G``, both [B, K, h, w] float32 (G = d score / d A, the same shape), and
returns a map [B, h, w] float32 ≥ 0 at the layer's resolution. Input-space methods take the input ``x`` and
its gradient ``dx`` [B, C, H, W] and return [B, H, W] ≥ 0. The engine computes A, G (and dx) once, from one
forward and one backward pass, and calls any number of these on them.

The formulas follow pytorch-grad-cam (the parity reference), with one deliberate difference each for
gradcam++ and the eigen methods, documented on the functions.

``METHODS`` is the registry (one name, one function); ``ALIASES`` maps the other spellings to it;
``resolve_method`` turns a user string into a canonical name (``ms-`` prefix = multi-layer fusion).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evidrift.core.errors import UsageError

#: xgradcam's epsilon in Σ_hw A + ε (pytorch-grad-cam's value).
XGRADCAM_EPS = 1e-7
#: Prefix of multi-layer fusion methods (``ms-gradcam``: every layer's map, fused).
FUSION_PREFIX = "ms-"


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] → [B, K, 1, 1]."""
    return t.sum(dim=(2, 3), keepdim=True)


def _weighted(weights: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k): weights [B, K, 1, 1], A [B, K, h, w] → [B, h, w]."""
    return torch.relu((weights * A).sum(dim=1))


def gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): w_k = mean_hw G_k; map = ReLU(Σ_k w_k A_k). [B, h, w] ≥ 0."""
    return _weighted(G.mean(dim=(2, 3), keepdim=True), A)


def gradcam_plusplus(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential score's closed form).

    α = G² / (2G² + (Σ_hw A)·G³), 0 where the denominator is 0; w_k = Σ_hw ReLU(G)·α; map = ReLU(Σ_k w_k A_k).
    Σ_hw A is the per-channel spatial sum times G³ element-wise, as in pytorch-grad-cam. Where G ≠ 0 the ratio
    equals 1 / (2 + (Σ_hw A)·G), computed in that form so that G³ cannot underflow; pytorch-grad-cam instead
    adds 1e-6 to the denominator, which only shows on maps whose gradients are ~1e-3 or smaller.
    """
    s = _spatial_sum(A)
    base = 2.0 + s * G
    usable = (G != 0) & (base != 0)
    alpha = torch.where(usable, 1.0 / torch.where(usable, base, torch.ones_like(base)), torch.zeros_like(G))
    return _weighted(_spatial_sum(torch.relu(G) * alpha), A)


def layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): map = ReLU(Σ_k ReLU(G_k) ⊙ A_k). [B, h, w] ≥ 0."""
    return torch.relu((torch.relu(G) * A).sum(dim=1))


def xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_hw(G·A) / (Σ_hw A + 1e-7); map = ReLU(Σ_k w_k A_k)."""
    return _weighted(_spatial_sum(G * A) / (_spatial_sum(A) + XGRADCAM_EPS), A)


def hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): map = ReLU(Σ_k G_k ⊙ A_k)."""
    return torch.relu((G * A).sum(dim=1))


def gradcam_elementwise(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): map = ReLU(Σ_k ReLU(G_k ⊙ A_k))."""
    return torch.relu(torch.relu(G * A).sum(dim=1))


def first_component_projection(M: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Projection of each sample's positions on the first principal component of its channels.

    M [B, K, h, w]: rows = the h·w positions, columns = the K channels, centred over positions (as
    pytorch-grad-cam's ``get_2d_projection``); returns X_c·v₁ [B, h, w] (v₁ = first right singular vector),
    computed in float64 from the smaller of the Gram matrices X_c X_cᵀ / X_cᵀ X_c. SVD leaves the sign
    arbitrary: it is fixed so that the projection correlates positively with ``reference`` [B, h, w]
    (pytorch-grad-cam keeps LAPACK's sign). Non-finite entries of M are set to 0 first. Not clipped.
    """
    B, K, h, w = M.shape
    X = torch.nan_to_num(M.detach().to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).reshape(B, K, h * w)
    X = X.transpose(1, 2)  # [B, hw, K]
    X = X - X.mean(dim=1, keepdim=True)
    if h * w <= K:
        gram = X @ X.transpose(1, 2)  # [B, hw, hw]
        eigvals, eigvecs = torch.linalg.eigh(gram)
        proj = eigvecs[..., -1] * eigvals[..., -1:].clamp_min(0).sqrt()  # [B, hw]
    else:
        cov = X.transpose(1, 2) @ X  # [B, K, K]
        _, eigvecs = torch.linalg.eigh(cov)
        proj = (X @ eigvecs[..., -1:]).squeeze(-1)
    ref = reference.detach().to(torch.float64).reshape(B, h * w)
    sign = torch.where((proj * (ref - ref.mean(dim=1, keepdim=True))).sum(dim=1) < 0, -1.0, 1.0)
    return (proj * sign[:, None]).reshape(B, h, w).to(M.dtype)


def eigencam(A: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): ReLU of the projection of A on its first principal component,
    sign fixed so that it correlates positively with Σ_k A_k (needs no gradient; ``G`` is ignored)."""
    return torch.relu(first_component_projection(A, A.sum(dim=1)))


def eigengradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Eigen-Grad-CAM: ReLU of the first-principal-component projection of G ⊙ A, sign fixed so that it
    correlates positively with Σ_k G_k A_k (ARCHITECTURE §5): the gradient's sign decides the orientation, so
    the map of −G is the map of G's negative evidence, not the same map."""
    GA = G * A
    return torch.relu(first_component_projection(GA, GA.sum(dim=1)))


def gradient_map(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Vanilla gradient saliency (Simonyan et al. 2014): max_c |d score / d x_c|. [B, H, W] ≥ 0."""
    return dx.abs().amax(dim=1)


def input_x_gradient_map(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Input × gradient: ReLU(Σ_c x_c · d score / d x_c) — the positive evidence, like the CAMs. [B, H, W]."""
    return torch.relu((x * dx).sum(dim=1))


def _lrp(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """LRP (zennit ``EpsilonPlusFlat``): ReLU(Σ_c relevance_c) [B, H, W] ≥ 0 (``evidrift.cam.lrp``)."""
    from evidrift.cam.lrp import lrp_map

    return lrp_map(model, x, target, score)


LayerMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InputMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method. ``kind``: ``layer`` (f(A, G) at a target layer), ``input`` (f(x, dx) at the
    input), or ``perturbation`` (own forwards, evidrift.cam.perturbation; with ``fn`` set:
    fn(model, x, target [B], score) → [B, H, W], e.g. ``lrp``). ``needs_grad``: needs G or dx."""

    name: str
    kind: str
    needs_grad: bool
    fn: Callable[..., torch.Tensor] | None = None


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("gradcam", "layer", True, gradcam),
        MethodSpec("gradcam++", "layer", True, gradcam_plusplus),
        MethodSpec("layercam", "layer", True, layercam),
        MethodSpec("xgradcam", "layer", True, xgradcam),
        MethodSpec("hirescam", "layer", True, hirescam),
        MethodSpec("gradcam_elementwise", "layer", True, gradcam_elementwise),
        MethodSpec("eigencam", "layer", False, eigencam),
        MethodSpec("eigengradcam", "layer", True, eigengradcam),
        MethodSpec("gradient", "input", True, gradient_map),
        MethodSpec("input_x_gradient", "input", True, input_x_gradient_map),
        MethodSpec("scorecam", "perturbation", False),
        MethodSpec("integrated_gradients", "perturbation", True),
        MethodSpec("smoothgrad", "perturbation", True),
        MethodSpec("lrp", "perturbation", True, _lrp),
    )
}

#: Other spellings → the registry name (compared after lower-casing).
ALIASES: dict[str, str] = {
    "grad-cam": "gradcam",
    "gradcampp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "grad-cam++": "gradcam++",
    "layer-cam": "layercam",
    "xgrad-cam": "xgradcam",
    "hires-cam": "hirescam",
    "gradcamelementwise": "gradcam_elementwise",
    "gradcam-elementwise": "gradcam_elementwise",
    "eigen-cam": "eigencam",
    "eigen-gradcam": "eigengradcam",
    "saliency": "gradient",
    "vanilla_gradient": "gradient",
    "inputxgradient": "input_x_gradient",
    "input-x-gradient": "input_x_gradient",
    "score-cam": "scorecam",
    "ig": "integrated_gradients",
    "integratedgradients": "integrated_gradients",
    "integrated-gradients": "integrated_gradients",
    "smooth-grad": "smoothgrad",
    "epsilon_plus_flat": "lrp",
}


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in METHODS else None


def resolve_method(name: str) -> str:
    """The registry name for ``name`` (aliases allowed; ``ms-`` + a layer method for multi-layer fusion).

    Raises ValueError naming the close known names when ``name`` is unknown.
    """
    raw = name.strip().lower()
    if raw.startswith(FUSION_PREFIX):
        inner = _canonical(raw[len(FUSION_PREFIX) :])
        if inner is None or METHODS[inner].kind != "layer":
            layer_methods = [n for n, s in METHODS.items() if s.kind == "layer"]
            raise UsageError(
                f"unknown fusion method {name!r}: `ms-` must prefix a layer method "
                f"({', '.join(layer_methods)})"
            )
        return FUSION_PREFIX + inner
    canonical = _canonical(raw)
    if canonical is None:
        known = [*METHODS, *ALIASES]
        close = difflib.get_close_matches(raw, known, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise UsageError(
            f"unknown CAM method {name!r}{hint} (known: {', '.join(METHODS)}; `ms-` prefix fuses layers)"
        )
    return canonical


def method_spec(name: str) -> MethodSpec:
    """The spec of a canonical name; for ``ms-X``, X's spec."""
    return METHODS[name[len(FUSION_PREFIX) :] if name.startswith(FUSION_PREFIX) else name]
