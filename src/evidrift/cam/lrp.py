"""Layer-wise relevance propagation through zennit (Anders et al., github.com/chr5tphr/zennit).

``lrp_relevance(model, x, target)`` runs zennit's ``EpsilonPlusFlat`` composite (the recommended composite
for CNNs: the flat rule on the first linear/conv layer, z⁺ on every other convolution, ε on fully connected
layers, BatchNorm merged into the preceding convolution, ReLU passing relevance unchanged, average pooling
and residual sums by the normalising rule) with zennit's ``Gradient`` attributor, the output relevance being
the target logit (``output · onehot(target)``, as the "How to Probe" reference does). Canonizers: zennit's
``SequentialMergeBatchNorm`` plus residual-sum canonizers for timm's ``BasicBlock`` / ``Bottleneck`` (the
timm analogue of zennit's torchvision ``ResNetCanonizer``: the in-place ``x += shortcut`` becomes a zennit
``Sum`` module, so that the sum gets its rule). Modules whose class is registered with
``register_pass_module`` (element-wise fixed rescalings) pass relevance through unchanged.

``lrp_map`` (the registered method ``lrp``): ReLU(Σ_c R_c) [B, H, W] — the positive evidence, like the other
input-space maps of ``evidrift.cam.methods``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

_PASS_TYPES: list[type[nn.Module]] = []


def register_pass_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Let LRP pass relevance through modules of class ``cls`` unchanged (for fixed element-wise rescalings,
    whose plain gradient would rescale the relevance). Returns ``cls``."""
    if cls not in _PASS_TYPES:
        _PASS_TYPES.append(cls)
    return cls


def _residual_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm BasicBlock / Bottleneck forward with the residual addition done by ``self.canonizer_sum``.

    ``self`` is typed ``Any``: it is either block class, and ``canonizer_sum`` is attached by the canonizer.
    """
    shortcut = x
    x = self.conv1(x)
    x = self.bn1(x)
    if hasattr(self, "conv3"):  # Bottleneck
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        last_act = self.act3
    else:  # BasicBlock
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        last_act = self.act2
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    x = self.canonizer_sum(torch.stack([shortcut, x], dim=-1))
    return last_act(x)


def _canonizers() -> list[object]:
    from timm.models.resnet import BasicBlock, Bottleneck
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum

    def attributes(name: str, module: nn.Module) -> dict[str, object] | None:
        if isinstance(module, BasicBlock | Bottleneck):
            return {"forward": types.MethodType(_residual_forward, module), "canonizer_sum": Sum()}
        return None

    return [SequentialMergeBatchNorm(), AttributeCanonizer(attributes)]


def _inplace_off(model: nn.Module) -> list[nn.Module]:
    """Switch off ``inplace`` on every activation that has it (zennit's hooks need out-of-place outputs);
    returns the modules changed, for ``_inplace_restore``."""
    changed = []
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]  # torch types Module.__setattr__ Tensor | Module
            changed.append(module)
    return changed


def lrp_relevance(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, score: str = "logit", epsilon: float = 1e-6
) -> torch.Tensor:
    """LRP relevance R [B, C, H, W] float32 of logits[b, target[b]] for x [B, C, H, W] (zennit
    ``EpsilonPlusFlat``, ε = stabilizer = ``epsilon``). The model's modules are restored afterwards
    (canonizers removed, in-place flags reset, train/eval flags restored; the model is run in eval mode).
    Parameter ``.grad`` is never touched. ``score`` must be ``logit`` (LRP distributes a logit)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Pass

    if score != "logit":
        raise ValueError(f"lrp explains the target logit; score={score!r} is not supported (use 'logit')")
    flags = [(m, m.training) for m in model.modules()]
    changed = _inplace_off(model)
    layer_map = [(cls, Pass()) for cls in _PASS_TYPES]
    composite = EpsilonPlusFlat(
        epsilon=epsilon, stabilizer=epsilon, layer_map=layer_map, canonizers=_canonizers()
    )
    target = target.to(x.device).long()
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().clone().float().requires_grad_(True)
            with Gradient(model=model, composite=composite) as attributor:

                def output_relevance(output: torch.Tensor) -> torch.Tensor:
                    onehot = torch.zeros_like(output)
                    onehot[torch.arange(output.shape[0]), target] = 1.0
                    return output * onehot

                _, relevance = attributor(leaf, output_relevance)
    finally:
        for module in changed:
            module.inplace = True  # type: ignore[assignment]  # torch types Module.__setattr__ Tensor | Module
        for module, training in flags:
            module.training = training
    return relevance.detach().float()


def lrp_map(model: nn.Module, x: torch.Tensor, target: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """The ``lrp`` method: ReLU(Σ_c R_c) [B, H, W] float32 ≥ 0 (``lrp_relevance``)."""
    return torch.relu(lrp_relevance(model, x, target, score).sum(dim=1))
