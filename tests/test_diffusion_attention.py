"""The diffusion study's attention capture (issue 15): processors restored, rows sum to one, exact maps."""

from __future__ import annotations

import pytest
import torch

from evidrift.data.reports import WordTokenizer
from evidrift.studies.diffusion import attention as att
from evidrift.studies.diffusion.config import parse_diffusion
from evidrift.studies.diffusion.models import build_schedulers, build_text_encoder, build_unet, text_states
from evidrift.studies.diffusion.scores import localization_values


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A 16 px UNet with (8, 16) channels (cross-attention at 8 × 8 and in the middle block)."""
    config = parse_diffusion(
        {
            "preset": "quick",
            "data": {"size": 16},
            "unet": {"channels": [8, 16], "head_dim": 4, "norm_groups": 4},
            "text": {"hidden": 8, "layers": 1, "heads": 2},
            "attention": {"timesteps": [10, 500], "map_size": 16},
        }
    )
    torch.manual_seed(0)
    tokenizer = WordTokenizer(max_length=config.text.max_length)
    unet = build_unet(config).eval()
    text = build_text_encoder(config, tokenizer).eval()
    ddpm, _ = build_schedulers(config)
    ids = torch.from_numpy(tokenizer.encode_batch(["right lower zone consolidation", "clear lungs"]))
    with torch.no_grad():
        states = text_states(text, ids)
    return config, unet, ddpm, states


def test_capture_restores_the_original_processors(tiny):
    _, unet, _, states = tiny
    before = dict(unet.attn_processors)
    with att.capture_cross_attention(unet) as store:
        inside = unet.attn_processors
        cross = [k for k in inside if k.endswith("attn2.processor")]
        assert cross and all(isinstance(inside[k], att.CaptureProcessor) for k in cross)
        assert all(inside[k] is before[k] for k in inside if k.endswith("attn1.processor"))
        unet(torch.zeros(2, 1, 16, 16), torch.tensor([1, 1]), encoder_hidden_states=states)
        assert len(store.maps) == len(cross)
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_capture_restores_the_processors_after_an_exception(tiny):
    _, unet, _, _ = tiny
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), att.capture_cross_attention(unet):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_capture_leaves_the_output_unchanged(tiny):
    _, unet, _, states = tiny
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 300])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=states).sample
        with att.capture_cross_attention(unet):
            captured = unet(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)


def test_captured_rows_sum_to_one_over_tokens(tiny):
    config, unet, ddpm, states = tiny
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad(), att.capture_cross_attention(unet) as store:
        unet(images, torch.tensor([3, 3]), encoder_hidden_states=states)
    for name, probs in store.maps.items():
        assert probs.shape[0] == 2 and probs.shape[-1] == config.text.max_length, name
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:2]), atol=1e-5, rtol=0)
    captured = att.capture_maps(unet, ddpm, images, states, ["a", "b"], [10, 500], seed=0, map_size=16)
    assert captured.maps.shape == (2, len(store.maps), 2, config.text.max_length, 16, 16)
    # every upsampled pixel of every layer and timestep still sums to one over the tokens
    torch.testing.assert_close(
        captured.maps.sum(dim=3), torch.ones(2, len(store.maps), 2, 16, 16), atol=1e-5, rtol=0
    )


def test_noise_is_seeded_per_image_and_timestep():
    a = att.seeded_noise((1, 4, 4), 0, ["x", "y"], 10)
    b = att.seeded_noise((1, 4, 4), 0, ["y", "x"], 10)
    torch.testing.assert_close(a[0], b[1])  # the same image gets the same noise wherever it sits in a batch
    assert not torch.equal(a[0], att.seeded_noise((1, 4, 4), 0, ["x"], 11)[0])
    assert not torch.equal(a[0], att.seeded_noise((1, 4, 4), 1, ["x"], 10)[0])


def test_to_spatial_repeats_for_integer_factors():
    probs = torch.zeros(1, 4, 2)  # a 2 × 2 map over two tokens
    probs[0, 3, 1] = 1.0  # bottom-right cell attends token 1
    probs[0, :3, 0] = 1.0
    maps = att.to_spatial(probs, 4)
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = 1.0
    torch.testing.assert_close(maps[0, 1], expected)
    torch.testing.assert_close(maps[0, 0], 1.0 - expected)


def test_word_maps_average_the_words_tokens():
    maps = torch.zeros(1, 1, 1, 3, 2, 2)
    maps[0, 0, 0, 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    maps[0, 0, 0, 2] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    captured = att.CapturedMaps(maps, ("l",), (1,))
    weights = att.token_weights([[1, 2]], 3)
    out = att.word_maps(captured, weights)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert att.token_weights([[]], 3).sum() == 0


def test_hand_built_attention_on_the_lesion_scores_pointing_game_one():
    """Attention probabilities [1, h·w, tokens] that put the query token's mass on a known 2 × 2 region go
    through the study's path (to_spatial → word map → localization) and score pointing game 1."""
    side, tokens, query = 8, 4, 2
    probs = torch.full((1, side * side, tokens), 1.0 / tokens)
    region = torch.zeros(side, side, dtype=torch.bool)
    region[5:7, 1:3] = True
    flat = region.flatten()
    probs[0, flat] = 0.0
    probs[0, flat, query] = 1.0  # those pixels attend only the query token
    assert torch.allclose(probs.sum(-1), torch.ones(1, side * side))
    spatial = att.to_spatial(probs, 16)[:, None, None]  # [1, layers=1, timesteps=1, tokens, 16, 16]
    word = att.word_maps(att.CapturedMaps(spatial, ("l",), (0,)), att.token_weights([[query]], tokens))
    mask = region.repeat_interleave(2, 0).repeat_interleave(2, 1)[None]
    values = localization_values(word.mean(dim=(1, 2)), mask)
    assert values["pointing_game"].item() == 1.0
    assert values["pixel_auroc"].item() == 1.0
    assert values["energy_pointing_game"].item() == pytest.approx(16 / (16 + 0.25 * (256 - 16)))
