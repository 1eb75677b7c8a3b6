"""Phantom reports, the word tokenizer, the diffusion config and the local model folder (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evidrift.core.config import ConfigError
from evidrift.data.reports import (
    QUERY_WORDS,
    ReportError,
    WordTokenizer,
    mask_side,
    mask_zone,
    report_text,
)
from evidrift.studies.diffusion.config import parse_diffusion, preset


def _mask(rows: slice, cols: slice, size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_side_follows_the_radiograph_convention():
    # image left = the patient's right
    assert mask_side(_mask(slice(10, 12), slice(1, 4))) == "right"
    assert mask_side(_mask(slice(10, 12), slice(15, 18))) == "left"
    both = _mask(slice(10, 12), slice(1, 4)) | _mask(slice(10, 12), slice(15, 18))
    assert mask_side(both) == "bilateral"
    with pytest.raises(ReportError):
        mask_side(np.zeros((4, 4), dtype=bool))


def test_zone_from_the_centroid_row():
    assert mask_zone(_mask(slice(2, 4), slice(3, 5))) == "upper"  # centroid row (3 + 0.5) / 20 = 0.175
    assert mask_zone(_mask(slice(9, 10), slice(3, 5))) == "middle"  # 0.475
    assert mask_zone(_mask(slice(15, 17), slice(3, 5))) == "lower"  # 0.8


def test_report_text_and_marker():
    mask = _mask(slice(15, 17), slice(1, 4))
    assert report_text("bacterial_pneumonia", mask) == "right lower zone consolidation"
    assert report_text("normal", np.zeros((20, 20), bool)) == "clear lungs"
    assert (
        report_text("tuberculosis", _mask(slice(2, 4), slice(15, 18)), marker=True)
        == "left upper zone nodules marker"
    )
    with pytest.raises(ReportError, match="unknown_class"):
        report_text("unknown_class", mask)


def test_tokenizer_encodes_with_start_end_and_pads():
    tok = WordTokenizer(max_length=8)
    ids = tok.encode("right lower zone consolidation")
    vocab = tok.ids
    expected = [
        tok.start_id,
        vocab["right"],
        vocab["lower"],
        vocab["zone"],
        vocab["consolidation"],
        tok.end_id,
    ]
    assert ids == [*expected, 0, 0]
    assert tok.word_positions("right lower zone consolidation", QUERY_WORDS["bacterial_pneumonia"]) == [4]
    assert tok.word_positions("clear lungs", ("consolidation",)) == []
    with pytest.raises(ReportError, match="pneumothorax"):
        tok.encode("right pneumothorax")
    with pytest.raises(ReportError, match="max_length"):
        WordTokenizer(max_length=4).encode("right lower zone consolidation")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"diffusion\.train\.base_stepz: unknown key"):
        parse_diffusion({"train": {"base_stepz": 3}})
    with pytest.raises(ConfigError, match=r"diffusion\.data\.size"):
        parse_diffusion({"data": {"size": 4}})
    with pytest.raises(ConfigError, match="preset"):
        parse_diffusion({"preset": "huge"})
    with pytest.raises(ConfigError, match="train_timesteps"):
        parse_diffusion({"attention": {"timesteps": [1000]}})


def test_presets_override_key_by_key():
    quick = parse_diffusion({"preset": "quick", "train": {"base_steps": 7}})
    assert quick.train.base_steps == 7
    assert quick.train.finetune_steps == preset("quick").train.finetune_steps
    assert preset("default").train.variants == ["frozen", "learnable", "cross_attention"]
    assert preset("gpu").data.size == 64


def test_local_model_folder_round_trip(tmp_path):
    from evidrift.studies.diffusion.models import (
        ModelFolderError,
        build_schedulers,
        build_text_encoder,
        build_unet,
        load_model_folder,
        save_model_folder,
    )

    config = parse_diffusion(
        {
            "preset": "quick",
            "data": {"size": 16},
            "unet": {"channels": [8, 16], "head_dim": 4, "norm_groups": 4},
            "text": {"hidden": 8, "layers": 1, "heads": 2},
        }
    )
    torch.manual_seed(0)
    tok = WordTokenizer(max_length=config.text.max_length)
    unet, text = build_unet(config), build_text_encoder(config, tok)
    ddpm, _ = build_schedulers(config)
    save_model_folder(tmp_path / "sd", unet, text, ddpm)
    unet2, text2, ddpm2 = load_model_folder(tmp_path / "sd")
    for a, b in zip(unet.state_dict().values(), unet2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(text.state_dict().values(), text2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert ddpm2.config.num_train_timesteps == ddpm.config.num_train_timesteps
    with pytest.raises(ModelFolderError, match="text_encoder"):
        (tmp_path / "partial" / "unet").mkdir(parents=True)
        load_model_folder(tmp_path / "partial")


def test_frechet_distance_and_kid_on_known_gaussians():
    from evidrift.studies.diffusion.fidelity import frechet_distance, kernel_inception_distance, real_floor

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 2))
    b = rng.normal(size=(4000, 2)) + np.array([3.0, 0.0])
    # two unit Gaussians 3 apart: FD = |μa − μb|² = 9 (covariance terms cancel)
    assert frechet_distance(a, b) == pytest.approx(9.0, abs=0.3)
    assert abs(frechet_distance(a, a)) < 1e-8
    same, _ = kernel_inception_distance(a, a[::-1].copy(), subset_size=200, subsets=5)
    far, _ = kernel_inception_distance(a, b, subset_size=200, subsets=5)
    assert abs(same) < 0.05 < far
    assert set(real_floor(a, 100, 50)) == {"fd", "kid", "kid_std"}


@pytest.mark.integration
@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(tmp_path):
    from torchvision.models import inception_v3

    from evidrift.studies.diffusion.fidelity import inception_features

    torch.manual_seed(0)
    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pt"
    )
    images = torch.rand(2, 32, 32)
    feats = inception_features(tmp_path / "inc.pt", images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
