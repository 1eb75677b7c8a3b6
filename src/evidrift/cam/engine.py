"""The multi-method CAM engine: every layer method, every layer, from ONE forward and ONE backward pass.

    with CAMEngine(model, layers=["features.norm5"]) as engine:
        out = engine(x, "label", labels=y, methods=["gradcam", "gradcam++", "layercam"])
        out.maps["gradcam++"]       # [B, h, w] float32 ≥ 0 on x's device (several layers: [(layer, method)])
        out.logits, out.degenerate  # [B, C]; {key: bool [B]} (all-zero or non-finite map)

How it works (torchcam-style: the engine runs the caller's model, forward hooks capture the activations):

* The forward runs with autograd off until the first target layer. Its forward hook turns autograd on and
  captures the layer's output as a fresh leaf that requires grad, so the graph (and the backward) only
  spans the part of the network above the target layers; nothing below them is recorded, and no parameter
  ever needs a gradient. A layer that depends on an earlier target layer is captured inside the graph.
* The hook returns a *clone* of the captured tensor to the model: in-place operations that follow the layer
  (an in-place ReLU after a conv, timm's ``BatchNormAct2d``) modify the clone, never the captured A.
* One ``torch.autograd.grad(Σ_b score_b, [A_1..A_L] (+ x))`` gives every G (parameter ``.grad`` untouched);
  with several targets per image (multi-label) the same single call is batched over the targets
  (``is_grads_batched``). Each method is then a pure function of (A, G) (``evidrift.cam.methods``).
* Modules' train/eval flags are saved, the model is run in eval mode and the flags are restored; hooks are
  removed in ``__exit__`` (also after an exception); works when the caller is in ``torch.no_grad()`` or
  ``torch.inference_mode()``; no state survives a call, so memory is flat over any number of calls.

Activations are brought to [B, K, h, w]: channels-last [B, h, w, K] maps (timm Swin stages) are detected
from the input's aspect and permuted; token sequences [B, N, K] (ViT, DeiT) are reshaped to the patch grid
after dropping the ``num_prefix_tokens`` class/register tokens.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from evidrift.cam import perturbation
from evidrift.cam.maps import is_degenerate, minmax_normalize, upsample
from evidrift.cam.methods import FUSION_PREFIX, method_spec, resolve_method
from evidrift.core.errors import UsageError

MapKey = str | tuple[str, str]
Targets = str | int | torch.Tensor | Sequence[int] | Sequence[Sequence[int]]
Layout = Literal["auto", "NCHW", "NHWC", "NLC"]


@dataclass
class CAMResult:
    """What one engine call returns.

    ``maps``: key → float32 ≥ 0 on x's device. Layer methods and ``scorecam``: [B, h, w] at the layer's
    resolution, key = method name with one layer, (layer, method) with several. ``ms-*`` fusions: the largest
    layer's resolution; input methods (``gradient``, ``input_x_gradient``, ``integrated_gradients``,
    ``smoothgrad``): the input resolution [B, H, W]; both keyed by the method name. With several targets per
    image (targets [B, T]) every map gains a target axis: [B, T, h, w].
    ``logits``: [B, C] float32 (detached). ``degenerate``: key → bool [B] (or [B, T]): all-zero or
    non-finite map. ``targets``: the class indices explained, long [B] (or [B, T]). ``layers``: dotted names.
    """

    maps: dict[MapKey, torch.Tensor]
    logits: torch.Tensor
    degenerate: dict[MapKey, torch.Tensor]
    targets: torch.Tensor
    layers: list[str] = field(default_factory=list)


def resolve_layers(model: nn.Module, layers: Sequence[str] | str) -> dict[str, nn.Module]:
    """Dotted module names → modules, in the given order (duplicates removed).

    A name missing from ``model`` is also tried under ``module.`` (DataParallel / DDP wrappers). Raises
    ValueError naming the closest module names when a name is not a module of the model.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError(
            "CAMEngine needs at least one target layer (a dotted module name such as 'features.norm5')"
        )
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name, modules.get(f"module.{name}") if name else None)
        if module is None or not name:
            candidates = [n for n in modules if n]
            close = difflib.get_close_matches(name, candidates, n=8, cutoff=0.5)
            raise UsageError(
                f"target layer {name!r} is not a module of {type(model).__name__}; closest names: "
                f"{close or candidates[-8:]} (see model.named_modules())"
            )
        resolved[name] = module
    return resolved


def _plausible_stride(h: int, w: int, H: int, W: int) -> bool:
    """True when an [h, w] grid can be a feature map of an [H, W] input (same stride along both axes)."""
    if h < 1 or w < 1 or h > H or w > W:
        return False
    sh, sw = H / h, W / w
    return abs(sh - sw) <= 0.25 * max(sh, sw) + 1e-9


def channels_first(
    t: torch.Tensor, input_hw: tuple[int, int], layout: Layout, prefer_nhwc: bool = False
) -> torch.Tensor:
    """A 4-D feature map as [B, K, h, w]. ``auto``: NHWC when only that reading has a plausible stride for the
    input size ``input_hw`` (or both do and ``prefer_nhwc``, e.g. a timm model with ``output_fmt='NHWC'``)."""
    if layout == "NCHW":
        return t
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    H, W = input_hw
    nchw = _plausible_stride(t.shape[2], t.shape[3], H, W)
    nhwc = _plausible_stride(t.shape[1], t.shape[2], H, W)
    if nhwc and (not nchw or prefer_nhwc):
        return t.permute(0, 3, 1, 2)
    return t


def token_grid(
    n_tokens: int, input_hw: tuple[int, int], num_prefix: int | None, patch: tuple[int, int] | None
) -> tuple[int, int, int]:
    """(prefix, h, w) for a token sequence of length ``n_tokens``: prefix class/register tokens dropped, the
    rest an h × w patch grid (from the input size and patch size when known, else square).

    Raises ValueError when no grid fits (pass ``num_prefix_tokens`` / ``layout`` to the engine).
    """
    prefixes = [num_prefix] if num_prefix is not None else [0, 1]
    for prefix in prefixes:
        n = n_tokens - prefix
        if n <= 0:
            continue
        if patch is not None:
            h, w = input_hw[0] // patch[0], input_hw[1] // patch[1]
            if h * w == n:
                return prefix, h, w
        side = math.isqrt(n)
        if side * side == n:
            return prefix, side, side
    raise ValueError(
        f"cannot reshape {n_tokens} tokens (input {input_hw}, {num_prefix} prefix tokens) to a patch grid; "
        "pass CAMEngine(num_prefix_tokens=...) or a layer whose output is a [B, K, h, w] feature map"
    )


class CAMEngine:
    """Hooks on ``layers`` of ``model``; calling the engine runs one forward + one backward (see module doc).

    ``layout``: how activations are read (``auto``, ``NCHW``, ``NHWC``, ``NLC`` = tokens [B, N, K]).
    ``num_prefix_tokens``: class/register tokens before the patch tokens (default: the model's attribute,
    else guessed). ``chunk_size``: samples per forward in scorecam/integrated_gradients/smoothgrad (bounds
    their memory). ``ig_steps``, ``smoothgrad_samples``, ``smoothgrad_noise``: see ``perturbation``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | str,
        layout: Layout = "auto",
        num_prefix_tokens: int | None = None,
        chunk_size: int = 64,
        ig_steps: int = 32,
        smoothgrad_samples: int = 16,
        smoothgrad_noise: float = 0.15,
        seed: int = 0,
    ) -> None:
        if layout not in ("auto", "NCHW", "NHWC", "NLC"):
            raise UsageError(f"layout must be one of auto, NCHW, NHWC, NLC; got {layout!r}")
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.layers = list(self.modules)
        self.layout: Layout = layout
        prefix = (
            num_prefix_tokens if num_prefix_tokens is not None else getattr(model, "num_prefix_tokens", None)
        )
        self.num_prefix_tokens = None if prefix is None else int(prefix)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        self.patch_size: tuple[int, int] | None = (
            (int(patch[0]), int(patch[1])) if patch is not None else None
        )
        self.prefer_nhwc = getattr(model, "output_fmt", None) in ("NHWC", "nhwc")
        self.chunk_size = int(chunk_size)
        self.ig_steps = int(ig_steps)
        self.smoothgrad_samples = int(smoothgrad_samples)
        self.smoothgrad_noise = float(smoothgrad_noise)
        self.seed = int(seed)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._acts: dict[str, torch.Tensor] = {}
        self._capturing = False
        self._need_graph = False

    # --- hooks ---------------------------------------------------------------------------------------------
    def __enter__(self) -> CAMEngine:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.modules.items()]

    def detach(self) -> None:
        """Remove the hooks and drop any captured tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._acts = {}
        self._capturing = False

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
            if not self._capturing:
                return None
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"target layer {name!r} returns {type(output).__name__}, not a tensor; pick a module "
                    "whose output is the feature map"
                )
            if name in self._acts:
                raise UsageError(
                    f"target layer {name!r} ran twice in one forward pass; pick a module that runs once"
                )
            if self._need_graph:
                torch.set_grad_enabled(True)  # record only from here on (restored when the forward returns)
                captured = output if output.requires_grad else output.detach().requires_grad_(True)
            else:
                captured = output.detach()
            self._acts[name] = captured
            return captured.clone()  # what the model continues with: in-place ops there leave A intact

        return hook

    # --- the call ------------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        targets: Targets = "prediction",
        methods: Sequence[str] | str = ("gradcam",),
        score: Literal["logit", "softmax"] = "logit",
        labels: torch.Tensor | Sequence[int] | None = None,
    ) -> CAMResult:
        """Explain a batch ``x`` [B, C, H, W] for ``targets``: ``"label"`` (needs ``labels``),
        ``"prediction"``, an int, class indices [B], or several per image [B, T] / a list of equal-length
        lists (then every map is [B, T, ...]). ``score``: the target ``logit`` or its ``softmax``
        probability. See ``CAMResult``."""
        if score not in ("logit", "softmax"):
            raise UsageError(f"score must be 'logit' or 'softmax', got {score!r}")
        names = [resolve_method(m) for m in ([methods] if isinstance(methods, str) else methods)]
        if not names:
            raise ValueError("no CAM method requested")
        if x.ndim != 4:
            raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
        if not self._handles:
            with self:
                return self._run(x, targets, names, score, labels)
        return self._run(x, targets, names, score, labels)

    def _run(self, x: torch.Tensor, targets: Targets, names: list[str], score: str, labels: Any) -> CAMResult:
        specs = {n: method_spec(n) for n in names}
        layer_grads = any(s.kind == "layer" and s.needs_grad for s in specs.values())
        input_grads = any(s.kind == "input" for s in specs.values())
        flags = [(m, m.training) for m in self.model.modules()]
        x = x.detach()
        if x.is_inference():
            x = x.clone()
        try:
            self.model.eval()
            with torch.inference_mode(False):
                x_in = x.clone().requires_grad_(True) if input_grads else x
                self._need_graph = layer_grads or input_grads
                self._acts = {}
                self._capturing = True
                try:
                    with torch.set_grad_enabled(input_grads):
                        logits = self.model(x_in)
                finally:
                    self._capturing = False
                missing = [n for n in self.layers if n not in self._acts]
                if missing:
                    raise ValueError(
                        f"target layers {missing} did not run in the forward pass of "
                        f"{type(self.model).__name__}"
                    )
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ValueError(
                        f"the model must return logits [B, C], got {getattr(logits, 'shape', type(logits))}"
                    )
                idx = resolve_targets(targets, logits.detach(), labels)
                grads = self._backward(logits, idx, score, x_in if input_grads else None, layer_grads)
                result = self._assemble(specs, x, x_in, idx, grads, score)
                return CAMResult(
                    maps=result,
                    logits=logits.detach().float(),
                    degenerate={k: is_degenerate(v) for k, v in result.items()},
                    targets=idx if idx.shape[1] > 1 else idx[:, 0],
                    layers=list(self.layers),
                )
        finally:
            self._acts = {}
            self._need_graph = False
            for module, training in flags:
                module.training = training

    def _backward(
        self,
        logits: torch.Tensor,
        idx: torch.Tensor,
        score: str,
        x_in: torch.Tensor | None,
        layer_grads: bool,
    ) -> list[torch.Tensor]:
        """One autograd.grad call: G for every layer (when needed) then dx (when x_in is given)."""
        inputs = [self._acts[n] for n in self.layers] if layer_grads else []
        if x_in is not None:
            inputs.append(x_in)
        if not inputs:
            return []
        with torch.enable_grad():
            values = torch.softmax(logits.float(), dim=1) if score == "softmax" else logits
            chosen = values.gather(1, idx)  # [B, T]
            if idx.shape[1] == 1:
                grads = torch.autograd.grad(chosen.sum(), inputs, allow_unused=True)
            else:
                T = idx.shape[1]
                eye = torch.eye(T, dtype=chosen.dtype, device=chosen.device)
                grad_outputs = eye[:, None, :].expand(T, chosen.shape[0], T)
                grads = torch.autograd.grad(
                    chosen, inputs, grad_outputs=grad_outputs, allow_unused=True, is_grads_batched=True
                )
        names = [*(self.layers if layer_grads else []), *(["input"] if x_in is not None else [])]
        checked: list[torch.Tensor] = []
        for name, g in zip(names, grads, strict=True):
            if g is None:
                raise UsageError(
                    f"the target score does not depend on {name!r}; pick a layer the output depends on"
                )
            checked.append(g.detach())
        return checked

    def _to_grid(self, t: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """A captured activation (or its gradient) as [B, K, h, w] float32."""
        if t.ndim == 3 or self.layout == "NLC":
            if t.ndim != 3:
                raise ValueError(f"layout NLC expects [B, N, K] tokens, got shape {tuple(t.shape)}")
            prefix, h, w = token_grid(t.shape[1], input_hw, self.num_prefix_tokens, self.patch_size)
            return t[:, prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2).float()
        if t.ndim != 4:
            raise ValueError(
                "target layer activations must be [B, K, h, w], [B, h, w, K] or [B, N, K]; "
                f"got {tuple(t.shape)}"
            )
        return channels_first(t, input_hw, self.layout, self.prefer_nhwc).float()

    def _assemble(
        self,
        specs: dict[str, Any],
        x: torch.Tensor,
        x_in: torch.Tensor,
        idx: torch.Tensor,
        grads: list[torch.Tensor],
        score: str,
    ) -> dict[MapKey, torch.Tensor]:
        B, T = idx.shape
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        layer_names = {n.removeprefix(FUSION_PREFIX) for n, s in specs.items() if s.kind == "layer"}
        layer_grads = any(s.kind == "layer" and s.needs_grad for s in specs.values())
        per_layer: dict[tuple[str, str], torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            A = self._to_grid(self._acts[layer].detach(), input_hw)
            G = None
            if layer_grads:
                g = grads[i]
                if T > 1:  # grads come batched over the targets: [T, B, ...] → [B·T, ...] (image-major)
                    g = g.transpose(0, 1).reshape(B * T, *g.shape[2:])
                G = self._to_grid(g, input_hw)
            if T > 1:
                A = A.unsqueeze(1).expand(B, T, *A.shape[1:]).reshape(B * T, *A.shape[1:])
            for name in layer_names:
                fn = method_spec(name).fn
                assert fn is not None
                cam = fn(A, G) if G is not None else fn(A, torch.zeros_like(A))
                per_layer[(layer, name)] = cam.reshape(B, T, *cam.shape[1:]) if T > 1 else cam
        single = len(self.layers) == 1
        out: dict[MapKey, torch.Tensor] = {}
        for name, spec in specs.items():
            if name.startswith(FUSION_PREFIX):
                out[name] = fuse([per_layer[(layer, name[len(FUSION_PREFIX) :])] for layer in self.layers])
            elif spec.kind == "layer":
                for layer in self.layers:
                    out[name if single else (layer, name)] = per_layer[(layer, name)]
            elif spec.kind == "input":
                dx = grads[-1]
                if T > 1:
                    dx = dx.transpose(0, 1).reshape(B * T, *dx.shape[2:])
                    xr = x.unsqueeze(1).expand(B, T, *x.shape[1:]).reshape(B * T, *x.shape[1:])
                    out[name] = spec.fn(xr.float(), dx.float()).reshape(B, T, *x.shape[-2:])
                else:
                    out[name] = spec.fn(x.float(), dx.float())
            else:
                out.update(self._perturbation(name, x, idx, score, single, input_hw))
        return {k: v.float() for k, v in out.items()}

    def _perturbation(
        self,
        name: str,
        x: torch.Tensor,
        idx: torch.Tensor,
        score: str,
        single: bool,
        input_hw: tuple[int, int],
    ) -> dict[MapKey, torch.Tensor]:
        """scorecam per layer (from the captured activations); integrated_gradients, smoothgrad at input."""
        T = idx.shape[1]
        results: dict[MapKey, torch.Tensor] = {}
        if name == "scorecam":
            for layer in self.layers:
                A = self._to_grid(self._acts[layer].detach(), input_hw)
                cams = [
                    perturbation.scorecam(
                        self.model, x, A, idx[:, t], score=score, chunk_size=self.chunk_size
                    )
                    for t in range(T)
                ]
                results[name if single else (layer, name)] = cams[0] if T == 1 else torch.stack(cams, dim=1)
            return results
        own = method_spec(name).fn  # a perturbation method with its own function (lrp)
        if own is not None:
            cams = [own(self.model, x, idx[:, t], score) for t in range(T)]
        elif name == "integrated_gradients":
            cams = [
                perturbation.integrated_gradients(
                    self.model, x, idx[:, t], score, self.ig_steps, self.chunk_size
                )
                for t in range(T)
            ]
        else:
            cams = [
                perturbation.smoothgrad(
                    self.model,
                    x,
                    idx[:, t],
                    score,
                    self.smoothgrad_samples,
                    self.smoothgrad_noise,
                    self.chunk_size,
                    seed=self.seed,
                )
                for t in range(T)
            ]
        results[name] = cams[0] if T == 1 else torch.stack(cams, dim=1)
        return results


def fuse(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-layer fusion: maps [..., h_l, w_l] upsampled (bilinear) to the largest, min-max normalized,
    averaged → [..., h, w] float32 in [0, 1]."""
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    return torch.stack([minmax_normalize(upsample(m, (int(size[0]), int(size[1])))) for m in maps]).mean(
        dim=0
    )


def resolve_targets(
    targets: Targets, logits: torch.Tensor, labels: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """Target class indices as long [B, T] on the logits' device.

    ``"label"`` → ``labels``; ``"prediction"`` → argmax of the logits; an int → that class for every image;
    a tensor/list [B] → one class per image; [B, T] / equal-length lists → T classes per image. Raises
    ValueError for a missing ``labels``, a wrong batch size, ragged lists or an index outside [0, C).
    """
    B, C = logits.shape
    if isinstance(targets, str):
        if targets == "prediction":
            idx = logits.argmax(dim=1, keepdim=True)
        elif targets == "label":
            if labels is None:
                raise ValueError("targets='label' needs the labels: engine(x, 'label', labels=y)")
            idx = torch.as_tensor(labels, dtype=torch.long, device=logits.device).reshape(-1, 1)
        else:
            raise ValueError(
                f"targets must be 'label', 'prediction', an int or class indices, got {targets!r}"
            )
    elif isinstance(targets, int):
        idx = torch.full((B, 1), targets, dtype=torch.long, device=logits.device)
    else:
        if not isinstance(targets, torch.Tensor):
            rows = list(targets)
            if rows and not isinstance(rows[0], int | torch.Tensor) and len({len(r) for r in rows}) > 1:  # type: ignore[arg-type]
                raise ValueError(
                    "multi-label targets must have the same number of classes per image (a [B, T] array)"
                )
        idx = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
        if idx.ndim == 1:
            idx = idx[:, None]
        if idx.ndim != 2:
            raise ValueError(f"targets must be [B] or [B, T] class indices, got shape {tuple(idx.shape)}")
    if idx.is_inference():  # created under torch.inference_mode: autograd cannot save it
        idx = idx.clone()
    if idx.shape[0] != B:
        raise ValueError(f"{idx.shape[0]} targets for a batch of {B} images")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= C):
        raise ValueError(
            f"target class indices must be in [0, {C}), got {idx.min().item()}..{idx.max().item()}"
        )
    return idx
