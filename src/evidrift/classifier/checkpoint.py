"""Checkpoints: weights as safetensors and a typed JSON sidecar (``CheckpointMeta``).

``models/{arch}/stage{s}.safetensors`` holds the state dict; ``stage{s}.json`` beside it the metadata a
checkpoint needs to be used alone — architecture, head, classes, preprocessing, the CAM layers, the training
stage, its metrics and config hash, library versions — and the SHA-256 of the weights file, so that a sidecar
left from other weights is caught (``read_checkpoint_meta``). Loading uses safetensors only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file
from torch import nn

import evidrift
from evidrift.classifier.config import HeadConfig
from evidrift.classifier.models import WeightsError, build_model, head_name, timm_api, unwrap
from evidrift.core.errors import MissingInputError
from evidrift.core.io import save_safetensors_atomic, write_json_atomic


# --- checkpoints --------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on."""
    return {"torch": torch.__version__, "timm": timm.__version__, "evidrift": evidrift.__version__}


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a checkpoint: ``stage1.safetensors`` → ``stage1.json``."""
    return Path(path).with_suffix(".json")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointMeta(BaseModel):
    """The sidecar of a checkpoint. ``head`` is the ``HeadConfig`` dump; ``stage`` 0/1/2 for the study's
    stages (None for a checkpoint saved by hand); ``metrics``: the best epoch's validation figures; extra
    keys (timings, ``standardized_features``) are kept as they are."""

    model_config = ConfigDict(extra="allow")

    arch: str = ""
    key: str | None = None
    timm_name: str = ""
    head_name: str = ""
    num_classes: int = 0
    in_chans: int = 3
    head: dict[str, Any] = Field(default_factory=lambda: HeadConfig().model_dump(mode="json"))
    classes: list[str] = Field(default_factory=list)
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    cam_layers: list[str] = Field(default_factory=list)
    loss: str = "ce"
    stage: int | None = None
    epoch: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    #: How far the stage moved the weights: ‖θ_end − θ_start‖ / ‖θ_start‖ of "backbone" and "head".
    weight_change: dict[str, float] = Field(default_factory=dict)
    config_hash: str | None = None
    weights: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    weights_sha256: str | None = None

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(**self.head)

    def preprocessing(self, path: str | os.PathLike[str]) -> tuple[int, list[float], list[float]]:
        """(image_size, mean, std) the checkpoint expects; ``MissingInputError`` naming ``path`` when the
        sidecar lacks them (a checkpoint saved without them cannot be fed images)."""
        if self.image_size is None or self.mean is None or self.std is None:
            raise MissingInputError(
                f"the sidecar of {path} lacks image_size, mean or std; save the checkpoint with them "
                "(`save_checkpoint(path, model, CheckpointMeta(image_size=..., mean=[...], std=[...], ...))`)"
            )
        return self.image_size, self.mean, self.std


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta | Mapping[str, Any]
) -> Path:
    """Write the model's state dict (safetensors) and the sidecar (``meta`` completed with ``timm_name``,
    ``head_name``, ``num_classes``, ``versions``, ``weights_sha256``), both atomically, weights first.
    Returns the weights path."""
    net = unwrap(model)
    given = meta if isinstance(meta, CheckpointMeta) else CheckpointMeta.model_validate(dict(meta))
    full = given.model_copy(
        update={
            "timm_name": str(timm_api(net).pretrained_cfg.get("architecture") or given.timm_name),
            "head_name": head_name(net),
            "num_classes": int(timm_api(net).num_classes),
            "versions": versions(),
        }
    )
    if not full.arch:
        full.arch = full.timm_name
    record = full.model_dump(mode="json", exclude={"weights_sha256"})
    state = {k: v.detach() for k, v in net.state_dict().items()}
    header = {"format": "evidrift-checkpoint", "meta": json.dumps(record, sort_keys=True, default=str)}
    weights = save_safetensors_atomic(path, state, header)
    write_json_atomic(sidecar_path(path), {**record, "weights_sha256": file_sha256(weights)})
    return weights


def read_checkpoint_meta(path: str | os.PathLike[str], verify: bool = True) -> CheckpointMeta:
    """The sidecar of a checkpoint. With ``verify`` the sidecar's ``weights_sha256`` must match the weights
    file, else ValueError (a sidecar left from other weights, or an interrupted write)."""
    weights, side = Path(path), sidecar_path(path)
    if not weights.is_file():
        raise MissingInputError(f"checkpoint {weights} does not exist; train it first (`evidrift train`)")
    if not side.is_file():
        raise MissingInputError(
            f"checkpoint {weights} has no sidecar {side}; the save was interrupted, retrain"
        )
    try:
        meta = CheckpointMeta.model_validate_json(side.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise WeightsError(f"sidecar {side} is not a valid checkpoint description: {exc}") from None
    if verify and meta.weights_sha256 != file_sha256(weights):
        raise WeightsError(
            f"sidecar {side} does not describe {weights} (SHA-256 differs): the save was interrupted or "
            "the files were mixed up; rerun the training stage"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild a model from a checkpoint and its sidecar: (model in eval mode on ``map_location``, meta)."""
    meta = read_checkpoint_meta(path)
    model = build_model(meta.timm_name, meta.num_classes, meta.head_config, "none", meta.in_chans)
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), meta
