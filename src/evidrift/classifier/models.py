"""timm-based classifiers: aliases, heads, weights, freezing, default CAM layers, checkpoint I/O
(ARCHITECTURE §4).

The model returned by ``build_model`` IS the timm model (so CAM layers keep timm's dotted names such as
``features.norm5``, ``norm`` or ``Mixed_7c``); only its classifier is replaced in place by an evidrift head
(``linear``, ``mlp2``, ``mlp3``) that takes the pooled backbone features [B, F] (or [B, F, 1, 1]) and returns
logits [B, C]. ``head_name(model)`` is the head's dotted path (``classifier``, ``head.fc``, ``fc``, ...) and
``get_head(model)`` the module, so that

    model(x) == get_head(model)(pooled_features(model, x))        # in eval mode

which is what stage 1's feature cache relies on.

Checkpoints: ``stage{s}.safetensors`` (the state dict) + its JSON sidecar (``.json``) holding the metadata
needed to rebuild the model (arch, timm name, head, classes, image size, mean/std, CAM layers, ...) and the
SHA-256 of the weights file, so a sidecar never describes other weights than its own. Both are written
atomically, weights first.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from evidrift.classifier.config import HeadConfig
from evidrift.core.errors import EvidriftError, UsageError

#: User-facing aliases of the paper's architectures → timm names.
ALIASES: dict[str, str] = {
    "densenet201": "densenet201",
    "resnet50v2": "resnetv2_50",
    "inceptionv3": "inception_v3",
}

#: Default CAM layer per timm family (ARCHITECTURE §4): the output of the last conv stage after its
#: activation.
_DEFAULT_CAM_LAYERS: tuple[tuple[str, str], ...] = (
    ("densenet", "features.norm5"),
    ("resnetv2_", "norm"),
    ("inception_v3", "Mixed_7c"),
)

#: The ``spatial`` CAM layer per timm family: the last layer before the default one where the CAM gradient
#: varies over space (the default layer feeds global average pooling and a linear head, which makes the
#: gradient constant over space and gradcam ≡ xgradcam ≡ hirescam, gradcam++ ≈ layercam there): the last
#: stage before its final BatchNorm + ReLU (densenet, resnetv2) or the block before the last (inception_v3).
_SPATIAL_CAM_LAYERS: tuple[tuple[str, str], ...] = (
    ("densenet", "features.denseblock4"),
    ("resnetv2_", "stages.3"),
    ("inception_v3", "Mixed_7b"),
)

_HUB_HOST = ("huggingface.co", 443)
_HUB_PROBE_TIMEOUT_S = 3.0


class WeightsError(EvidriftError, ValueError):
    """Weights that cannot be loaded; the message names the file/source and how to fix it."""


# --- names --------------------------------------------------------------------------------------------------
def resolve_arch(name: str) -> str:
    """The timm model name for an alias (``resnet50v2`` → ``resnetv2_50``) or a timm name.

    Raises ValueError naming the close timm names when ``name`` is neither.
    """
    timm_name = ALIASES.get(name.lower(), name)
    if timm.is_model(timm_name):
        return timm_name
    close = difflib.get_close_matches(name, [*ALIASES, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; did you mean one of {close}?" if close else ""
    raise UsageError(
        f"unknown architecture {name!r}: not an alias ({', '.join(ALIASES)}) nor a timm model name{hint}"
    )


def default_input_size(arch: str) -> int:
    """Input side in pixels: 299 for inception_v3, else the timm pretrained config's, else 224."""
    timm_name = resolve_arch(arch)
    if timm_name == "inception_v3":
        return 299
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is not None and cfg.input_size:
        return int(cfg.input_size[-1])
    return 224


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel the architecture's pretrained weights expect (ImageNet's when unknown)."""
    cfg = timm.models.get_pretrained_cfg(resolve_arch(arch))
    if cfg is not None and cfg.mean and cfg.std:
        return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- heads --------------------------------------------------------------------------------------------------
def build_head(in_features: int, num_classes: int, head: HeadConfig | None = None) -> nn.Sequential:
    """Classifier head [B, F] (or [B, F, 1, 1]) → logits [B, C].

    ``linear``: (dropout) + Linear(bias = ``head.bias``). ``mlp2``: Linear → BN → ReLU → (dropout) → Linear.
    ``mlp3``: two hidden blocks. Hidden layers are ``head.hidden`` wide; ``head.bias`` is the last layer's.
    """
    head = head or HeadConfig()
    layers: list[nn.Module] = [nn.Flatten(1)]
    width = in_features
    for _ in range({"linear": 0, "mlp2": 1, "mlp3": 2}[head.type]):
        layers += [
            nn.Linear(width, head.hidden, bias=False),
            nn.BatchNorm1d(head.hidden),
            nn.ReLU(inplace=True),
        ]
        width = head.hidden
        if head.dropout > 0:
            layers.append(nn.Dropout(head.dropout))
    if head.type == "linear" and head.dropout > 0:
        layers.append(nn.Dropout(head.dropout))
    layers.append(nn.Linear(width, num_classes, bias=head.bias))
    return nn.Sequential(*layers)


class StandardizedHead(nn.Module):
    """A head applied to standardized pooled features: x [B, F] (or [B, F, 1, 1]) → ``head((x − mean) /
    scale)``, logits [B, C]. Stage 1 trains its head so: the raw pooled features of a ReLU/BN backbone are
    all ≥ 0 with a large common mean, which a linear probe fits badly in a few hundred steps (measured on the
    demo's resnet50v2: test accuracy 0.29 raw, 0.52 standardized, same optimiser and budget).
    ``fold_standardization`` turns it back into a plain head computing the same function."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, head: nn.Module, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if mean.ndim != 1 or mean.shape != scale.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and scale {tuple(scale.shape)} must both be [F]")
        if not bool((scale > 0).all()):
            raise ValueError("every feature scale must be > 0")
        self.head = head
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features.flatten(1) - self.mean) / self.scale)


def _first_linear(head: nn.Module) -> tuple[nn.Linear, nn.Module | None]:
    """The first ``nn.Linear`` of a head (Sequential order) and the module right after it (or None)."""
    children = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    for index, child in enumerate(children):
        if isinstance(child, nn.Linear):
            return child, children[index + 1] if index + 1 < len(children) else None
    raise ValueError(f"the head {type(head).__name__} has no nn.Linear layer to fold a standardization into")


def can_center(head: nn.Module) -> bool:
    """Whether a mean subtraction can be folded into ``head``: its first linear layer has a bias, or is
    followed by a BatchNorm1d that absorbs the shift (a bias-free linear head can only be rescaled)."""
    linear, after = _first_linear(head)
    return linear.bias is not None or isinstance(after, nn.BatchNorm1d)


def feature_standardization(
    features: torch.Tensor, center: bool = True, eps: float = 1e-6, shared: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], scale [F]) float32 of pooled features [N, F]: the per-feature mean (zeros when not
    ``center``) and population standard deviation; a feature that is constant (std ≤ ``eps``) keeps scale 1
    so that it is only shifted, never blown up. ``shared``: one scale for every feature, the root mean
    square of the non-constant features' standard deviations (1 when all are constant), so that the
    features keep their relative sizes and a low-variance feature is not amplified above the others."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be [N, F] with N ≥ 1, got {tuple(features.shape)}")
    values = features.detach().double()
    mean = values.mean(0) if center else torch.zeros(values.shape[1], dtype=torch.float64)
    std = values.std(0, unbiased=False)
    varying = std > eps
    if shared:
        rms = std[varying].square().mean().sqrt() if bool(varying.any()) else torch.tensor(1.0).double()
        scale = torch.full_like(std, float(rms))
    else:
        scale = torch.where(varying, std, torch.ones_like(std))
    return mean.float(), scale.float()


@torch.no_grad()
def fold_standardization(wrapped: StandardizedHead) -> nn.Module:
    """The plain head of ``wrapped`` with the standardization folded into its first linear layer (modified
    in place and returned): W' = W / scale, and the shift W' · mean taken from the bias, or added to the
    running mean of the BatchNorm1d that follows a bias-free layer. In eval mode the result computes exactly
    ``wrapped``'s function (to float rounding); raises ValueError when a non-zero mean cannot be folded."""
    head = wrapped.head
    linear, after = _first_linear(head)
    weight = linear.weight / wrapped.scale
    shift = weight @ wrapped.mean
    linear.weight.copy_(weight)
    if linear.bias is not None:
        linear.bias.sub_(shift)
    elif isinstance(after, nn.BatchNorm1d) and after.running_mean is not None:
        after.running_mean.add_(shift)
    elif bool(wrapped.mean.any()):
        raise ValueError(
            "cannot fold a mean subtraction into a bias-free linear head; standardize with center=False"
        )
    return head


def head_name(model: nn.Module) -> str:
    """Dotted path of the classifier (our head) inside a timm model, e.g. ``classifier`` or ``head.fc``."""
    model = unwrap(model)
    classifier = timm_api(model).get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise ValueError(f"{type(model).__name__} has no single classifier module; evidrift cannot attach a head")


def get_head(model: nn.Module) -> nn.Module:
    """The classifier head module of a model built by ``build_model``."""
    return unwrap(model).get_submodule(head_name(model))


class TimmModel(Protocol):
    """The part of timm's model API that evidrift calls (``timm.create_model`` is typed ``nn.Module``)."""

    num_features: int
    num_classes: int
    pretrained_cfg: dict[str, Any]

    def get_classifier(self) -> nn.Module: ...
    def reset_classifier(self, num_classes: int) -> None: ...
    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def timm_api(model: nn.Module) -> TimmModel:
    """``model`` (unwrapped from DDP/DataParallel) typed as the timm model it is: the same object."""
    return cast(TimmModel, unwrap(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features after global pooling: x [B, 3, H, W] → [B, F] float (the head's input)."""
    net = timm_api(model)
    return net.forward_head(net.forward_features(x), pre_logits=True).flatten(1)


def num_pooled_features(model: nn.Module) -> int:
    """F, the width of ``pooled_features``."""
    model = unwrap(model)
    return int(getattr(model, "head_hidden_size", None) or timm_api(model).num_features)


# --- building and weights -----------------------------------------------------------------------------------
def build_model(
    arch: str,
    num_classes: int,
    head: HeadConfig | None = None,
    weights: str = "none",
    in_chans: int = 3,
) -> nn.Module:
    """A timm model with an evidrift head of ``num_classes`` outputs.

    ``weights``: ``none`` (random init; seed torch first for reproducibility), ``imagenet`` (timm hub; offline
    it fails fast, see ``WeightsError``), or a path to a local ``.safetensors``/``.pth``/``.pt`` state dict
    (e.g. a stage-0 checkpoint of the run); classifier keys of the file are ignored, every backbone key must
    match. Returns the model in train mode on CPU.
    """
    timm_name = resolve_arch(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if weights == "imagenet":
        model = _create_imagenet(timm_name, in_chans)
    else:
        model = timm.create_model(timm_name, pretrained=False, in_chans=in_chans)
    timm_api(model).reset_classifier(0)
    name = head_name(model)
    model.set_submodule(name, build_head(num_pooled_features(model), num_classes, head))
    timm_api(model).num_classes = num_classes
    if weights not in ("none", "imagenet"):
        load_backbone_weights(model, weights)
    return model


def check_input_size(model: nn.Module, size: int, where: str) -> None:
    """Raise ValueError when ``model`` cannot take [1, 3, size, size] inputs (a stride-2 stem without
    padding, e.g. inception_v3 below 75 px), naming ``where`` (the config keys that set the side). One
    forward pass in eval mode without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    except RuntimeError as error:
        raise UsageError(
            f"{type(unwrap(model)).__name__} cannot take {size} x {size} px inputs ({error}); raise {where}"
        ) from error
    finally:
        model.train(was_training)


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(_HUB_HOST, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_hub_file(timm_name: str) -> str | None:
    """Path of the model's timm weights in the local hub cache, or None (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=_hub_cache_dir())
        if isinstance(found, str):
            return found
    return None


def _create_imagenet(timm_name: str, in_chans: int) -> nn.Module:
    """timm's pretrained weights. Offline (HF_HUB_OFFLINE set, or the hub unreachable within a few seconds)
    only the local hub cache is used; a miss raises WeightsError at once, saying how to pass a local file."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    how = (
        "download the weights on a machine with network access (e.g. `timm.create_model("
        f"'{timm_name}', pretrained=True)` then `safetensors.torch.save_file(model.state_dict(), "
        f"'{timm_name}.safetensors')`) and set `weights: /path/to/{timm_name}.safetensors` in study.yaml, "
        "or use `weights: none` (stage 0 pretraining on the phantom source set)"
    )
    if offline or not _hub_reachable():
        cached = _cached_hub_file(timm_name)
        if cached is None:
            why = (
                "HF_HUB_OFFLINE is set"
                if offline
                else "the Hugging Face hub is not reachable from this machine"
            )
            raise WeightsError(
                f"weights: imagenet for {timm_name}: {why} and the weights are not in the local cache "
                f"{_hub_cache_dir()}; {how}"
            )
        overlay: dict[str, Any] = {"file": cached}
    else:
        overlay = {}
    try:
        return timm.create_model(
            timm_name, pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=overlay
        )
    except Exception as exc:  # the hub raises many types (OSError, HTTPError, ...); re-raised with the fix
        raise WeightsError(f"cannot load imagenet weights for {timm_name} ({exc}); {how}") from exc


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (``weights_only=True``).

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped; a leading ``module.`` is
    stripped from every key. Raises WeightsError naming the file when it is missing or unreadable.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsError(
            f"weights file {file} does not exist; `weights` must be none, imagenet or a path to a "
            ".safetensors/.pth state dict"
        )
    try:
        if file.suffix == ".safetensors":
            state: Any = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {file}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {file} does not hold a state dict (a mapping of names to tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load every backbone tensor of ``path`` into ``model``; the file's classifier keys are dropped.

    Raises WeightsError listing missing keys, unexpected keys and shape mismatches (first 8 of each).
    """
    model = unwrap(model)
    prefix = head_name(model) + "."
    timm_classifier = (timm_api(model).pretrained_cfg or {}).get("classifier") or ""
    drop = tuple(p for p in {prefix, f"{timm_classifier}."} if p != ".")
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(drop)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{len(items)} {what} (e.g. {items[:8]})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise WeightsError(
            f"weights file {path} does not fit {type(model).__name__} "
            f"({timm_api(model).pretrained_cfg.get('architecture', '?')}): {'; '.join(problems)}. "
            "Check that the file was saved from the same architecture (classifier keys are ignored)."
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {
        k for k in model.state_dict() if k.startswith(prefix)
    }:
        raise WeightsError(f"weights file {path}: load_state_dict reported {result}")


# --- CAM layers ---------------------------------------------------------------------------------------------
def default_cam_layers(model: nn.Module, arch: str) -> list[str]:
    """ARCHITECTURE §4's layer for the paper's families (densenet ``features.norm5``, resnetv2 ``norm``,
    inception_v3 ``Mixed_7c``), else the ``auto`` layer (timm ``feature_info``'s last entry)."""
    timm_name = resolve_arch(arch)
    modules = dict(unwrap(model).named_modules())
    for family, layer in _DEFAULT_CAM_LAYERS:
        if timm_name.startswith(family) and layer in modules:
            return [layer]
    return [_auto_cam_layer(model)]


def spatial_cam_layer(model: nn.Module, arch: str) -> str:
    """The ``spatial`` CAM layer (``_SPATIAL_CAM_LAYERS``); for timm ResNets (``resnet*``, not ``resnetv2``)
    the last BatchNorm of ``layer4``'s last block (before its residual add and ReLU). Raises ValueError for
    other families, asking for a dotted layer name."""
    timm_name = resolve_arch(arch)
    named = dict(unwrap(model).named_modules())
    for family, layer in _SPATIAL_CAM_LAYERS:
        if timm_name.startswith(family) and layer in named:
            return layer
    if timm_name.startswith("resnet") and not timm_name.startswith("resnetv2"):
        norms = [n for n, m in named.items() if n.startswith("layer4.") and isinstance(m, nn.BatchNorm2d)]
        norms = [n for n in norms if "downsample" not in n]
        if norms:
            return norms[-1]
    raise UsageError(
        f"no `spatial` CAM layer is known for {timm_name}; name a dotted layer before the last stage's "
        "pooling in cam_layers instead (see `model.named_modules()`)"
    )


def _auto_cam_layer(model: nn.Module) -> str:
    model = unwrap(model)
    info = getattr(model, "feature_info", None)
    names = dict(model.named_modules())
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        module = last.get("module", "")
        if module in names:
            return module
        if module.replace("_", ".") in names:
            return module.replace("_", ".")
    raise UsageError(
        f"{type(model).__name__} has no usable timm feature_info for cam_layers: auto; name the layer "
        "explicitly (a dotted module name, see `model.named_modules()`)"
    )


def resolve_cam_layers(
    model: nn.Module, arch: str, names: list[str] | tuple[str, ...] = ("default",)
) -> list[str]:
    """Dotted module names for ``names`` (``default``, ``spatial``, ``auto`` or dotted names), duplicates
    removed.

    Raises ValueError for a name that is not a module, with the closest module names as candidates.
    """
    return list(cam_layer_keys(model, arch, names))


def cam_layer_keys(
    model: nn.Module, arch: str, names: list[str] | tuple[str, ...] = ("default",)
) -> dict[str, str]:
    """Dotted module name → the name the study gave it (``default``, ``spatial``, ``auto`` or the dotted name
    itself), in order, duplicates removed. The study's names are what the drift statistics compare across
    architectures: ``default`` is a different module per architecture but the same role."""
    modules = [n for n, _ in unwrap(model).named_modules() if n]
    known = set(modules)
    layers: dict[str, str] = {}
    for name in names:
        if name == "default":
            resolved = default_cam_layers(model, arch)
        elif name == "spatial":
            resolved = [spatial_cam_layer(model, arch)]
        elif name == "auto":
            resolved = [_auto_cam_layer(model)]
        elif name in known:
            resolved = [name]
        else:
            close = difflib.get_close_matches(name, modules, n=8, cutoff=0.5)
            raise UsageError(
                f"cam layer {name!r} is not a module of {resolve_arch(arch)}; "
                f"candidates: {close or modules[-8:]} (or use `default` / `spatial` / `auto`)"
            )
        for layer in resolved:
            layers.setdefault(layer, name)
    return layers


# --- checks without training (`evidrift validate`) ----------------------------------------------------------
def check_model(
    arch: str, cam_layers: list[str] | tuple[str, ...], weights: str, head: HeadConfig | None = None
) -> list[str]:
    """Check one model of a study without training or allocating it: ``arch`` in timm's registry
    (``resolve_arch``), the model built on the meta device with ``head``, its ``cam_layers`` resolved
    (``resolve_cam_layers``) and a local ``weights`` file read and matched key by key against the backbone
    (``load_backbone_weights``; ``none`` and ``imagenet`` are not read). Returns the resolved CAM layers.
    Raises ValueError (unknown arch, unknown layer) or WeightsError naming the value and the fix."""
    import warnings

    with torch.device("meta"):
        model = build_model(arch, 2, head, "none")
    layers = resolve_cam_layers(model, arch, list(cam_layers))
    if weights not in ("none", "imagenet"):
        with warnings.catch_warnings():  # copying into meta tensors is a no-op, which is all a check needs
            warnings.simplefilter("ignore", UserWarning)
            load_backbone_weights(model, weights)
    return layers
