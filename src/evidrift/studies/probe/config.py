"""The ``probe:`` section: the head probe's heads, losses, attribution methods, grids and budget."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from evidrift.core.config import Section

# --- probe / sanity (issue 7) -------------------------------------------------------------------------------
ProbeHead = Literal["linear", "linear_nobias", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3"]


#: The "How to Probe" attribution set (``evidrift.studies.probe.attributions``).
PROBE_METHODS = ["gradcam", "input_x_gradient", "integrated_gradients", "lrp", "bcos"]


class ProbeConfig(Section):
    """Head probing study ("How to Probe"): on a frozen backbone (``backbone``: ``pretrained`` = the model's
    weights, or its stage-0 checkpoint when ``weights: none``; ``finetuned`` = the run's stage-2 backbone, for
    an in-domain backbone when pretraining transfers poorly), one head per ``losses`` × ``heads`` variant
    (same ``epochs``/``lr``/``batch_size``/``seed``), explained with ``methods``. Heads run at every position
    of the backbone's feature map (1 × 1 convolutions, ``hidden`` wide, average pooling after the last layer);
    ``standardize`` divides every channel by its training standard deviation for every variant alike. ``bce``
    targets are max(onehot, ``bce_off_label``) (null = 1/C, the reference's default). Layer methods run at
    ``layer`` (``reference`` = the last block's final convolution, ``features`` = the backbone output, or a
    dotted module name of the backbone). GridPG grids (n × n full-size images for n in ``grids``,
    ``n_grids`` of each) are built from test images every variant classifies correctly with probability ≥
    ``confidence`` (``grid_pool: all``: any test image, for tiny smoke runs); maps are smoothed by a
    ``smoothing`` × ``smoothing`` average pool (1 = none) before negative values are clipped. ``max_images``
    caps the test images explained against the lesion masks (null = all)."""

    backbone: Literal["pretrained", "finetuned"] = "pretrained"
    losses: Annotated[list[Literal["ce", "bce"]], Field(min_length=1)] = ["ce", "bce"]
    heads: Annotated[list[ProbeHead], Field(min_length=1)] = ["linear", "linear_nobias", "mlp2", "mlp3"]
    hidden: Annotated[int, Field(ge=1)] = 2048
    standardize: bool = True
    bce_off_label: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    layer: str = "reference"
    epochs: Annotated[int, Field(ge=1)] = 30
    lr: Annotated[float, Field(gt=0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 64
    methods: Annotated[list[str], Field(min_length=1)] = PROBE_METHODS
    ig_steps: Annotated[int, Field(ge=1, le=256)] = 20
    confidence: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    grid_pool: Literal["confident", "all"] = "confident"
    grids: Annotated[list[Annotated[int, Field(ge=2, le=8)]], Field(min_length=1)] = [2, 3]
    n_grids: Annotated[int, Field(ge=1)] = 50
    smoothing: Annotated[int, Field(ge=1, le=31)] = 5
    max_images: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0

    @field_validator("smoothing")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"probe.smoothing must be an odd kernel size (1 = no smoothing), got {value}")
        return value
