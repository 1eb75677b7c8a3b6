"""Which parts of a classifier train, stated explicitly: ``Freezing`` and the one function that switches
train/eval modes honouring it (``set_train_mode``). No method is patched and no flag is hidden on the model.

- stage 1 (transfer learning): ``freeze_backbone`` — every parameter outside the head gets
  ``requires_grad=False`` and the backbone's modules (BatchNorm statistics, dropout) stay in eval mode;
- stage 2 with ``freeze_batchnorm: true``: ``freeze_batchnorm_stats`` — every parameter trains (BatchNorm's
  affine ones included) but the backbone's BatchNorm layers normalise with their running statistics and never
  update them: Keras' fine-tuning recipe (``base_model(x, training=False)``). Fine-tuning then starts from the
  function the stage-1 head was trained on, instead of switching to batch statistics that can differ from the
  running ones by a third of the features' norm.

The training loop calls ``set_train_mode(model, True, freezing)`` where it would call ``model.train()``; a
plain ``model.train()`` puts every module in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from evidrift.classifier.models import head_name, unwrap


@dataclass(frozen=True)
class Freezing:
    """``backbone``: everything but the head is fixed (no gradients, eval mode). ``batchnorm``: the
    backbone's BatchNorm layers stay in eval mode (their parameters still train)."""

    backbone: bool = False
    batchnorm: bool = False


NOTHING_FROZEN = Freezing()


def _head_related(name: str, head: str) -> bool:
    return name == "" or name == head or name.startswith(head + ".") or head.startswith(name + ".")


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` outside its head (and not containing it)."""
    model = unwrap(model)
    head = head_name(model)
    return [m for name, m in model.named_modules() if not _head_related(name, head)]


def set_train_mode(model: nn.Module, train: bool, freezing: Freezing = NOTHING_FROZEN) -> nn.Module:
    """``model.train(train)``, then the frozen modules back in eval mode. Returns the model."""
    model.train(train)
    if not train or freezing == NOTHING_FROZEN:
        return model
    for module in backbone_modules(model):
        if freezing.backbone or (freezing.batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            module.training = False
    return model


def freeze_backbone(model: nn.Module) -> Freezing:
    """Fix everything but the head: ``requires_grad=False`` outside it, and the backbone in eval mode now.
    Returns the ``Freezing`` to pass to ``set_train_mode``."""
    inner = unwrap(model)
    head = head_name(inner)
    for name, param in inner.named_parameters():
        param.requires_grad_(name.startswith(head + "."))
    freezing = Freezing(backbone=True)
    set_train_mode(model, model.training, freezing)
    return freezing


def freeze_batchnorm_stats(model: nn.Module) -> Freezing:
    """Keep the backbone's BatchNorm layers in eval mode (every parameter stays trainable). Returns the
    ``Freezing`` to pass to ``set_train_mode``."""
    freezing = Freezing(batchnorm=True)
    set_train_mode(model, model.training, freezing)
    return freezing


def unfreeze(model: nn.Module) -> Freezing:
    """Every parameter trainable again (undoes ``freeze_backbone``); returns ``NOTHING_FROZEN``."""
    for param in model.parameters():
        param.requires_grad_(True)
    return NOTHING_FROZEN


def is_frozen(model: nn.Module) -> bool:
    """True when no parameter outside the head requires a gradient (``freeze_backbone`` is in effect)."""
    params = [p for m in backbone_modules(model) for p in m.parameters(recurse=False)]
    return bool(params) and not any(p.requires_grad for p in params)
