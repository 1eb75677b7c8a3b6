"""Training precision (``train.precision``): bf16 autocast + channels-last memory format, or plain fp32.

``resolve_precision(setting, device)`` turns the config value into a ``Precision``: ``fp32``; ``bf16``
(autocast to bfloat16 and channels-last, wherever asked); ``auto`` (bf16 where the device computes it
natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX; else fp32, since emulated bf16 is slower
than fp32). Training steps, validation and the stage-1 feature cache run under ``Precision.autocast``; the
master weights, the optimizer state and the loss stay float32. The CAM engine, the test-split evaluation and
every metric never run under autocast: they see the float32 model and float32 inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evidrift.core.errors import EvidriftError

PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


class PrecisionError(EvidriftError, ValueError):
    """A ``train.precision`` value that is not one of ``PRECISIONS``."""


@dataclass(frozen=True)
class Precision:
    """How a training stage computes: ``name`` ``fp32`` or ``bf16``; ``bf16`` means autocast to bfloat16
    on ``device_type`` and channels-last 4-D tensors."""

    name: Literal["fp32", "bf16"]
    device_type: str = "cpu"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def channels_last(self) -> bool:
        return self.bf16

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast(device_type, bfloat16)`` for bf16, a no-op context for fp32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model in channels-last memory format for bf16 (in place; weights keep their values)."""
        if not self.channels_last:
            return model
        return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit memory_format

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D image batch in channels-last format for bf16; anything else unchanged."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA with bf16 support, a CPU with AVX512-BF16 or AMX
    (oneDNN's fast bf16 kernels). Other devices: False."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return bool(torch.backends.mkldnn.is_available()) and any(
            bool(getattr(cpu, name, lambda: False)()) for name in checks
        )
    return False


def resolve_precision(setting: str, device: torch.device | str) -> Precision:
    """The ``Precision`` of ``train.precision`` = ``setting`` on ``device``: ``fp32``; ``bf16`` (asked for,
    used even where it is emulated); ``auto``: bf16 where ``bf16_native(device)``, else fp32. Raises
    ``PrecisionError`` naming the key for any other value."""
    device = torch.device(device)
    if setting not in PRECISIONS:
        raise PrecisionError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {setting!r}; "
            "auto uses bf16 where the device computes it natively, else fp32"
        )
    if setting == "auto":
        setting = "bf16" if bf16_native(device) else "fp32"
    return Precision("bf16" if setting == "bf16" else "fp32", device.type)
