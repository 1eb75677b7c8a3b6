"""Image readers: every format is written by the test itself, then read back with exact expected values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from builders import write_dicom
from evidrift.data.readers import ImageReadError, read_image, read_mask

GRADIENT8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
GRADIENT16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000 + 7).astype(np.uint16)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def test_png_8bit_gray(tmp_path: Path) -> None:
    Image.fromarray(GRADIENT8, mode="L").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.float32 and image.shape == (3, 4)
    np.testing.assert_allclose(image, GRADIENT8 / 255.0, atol=1e-7)


def test_png_16bit_gray_keeps_all_levels(tmp_path: Path) -> None:
    Image.fromarray(GRADIENT16).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), GRADIENT16 / 65535.0, atol=1e-7)


def test_png_rgb_rgba_and_palette_become_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png"), _luma(rgb), atol=1e-6)
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(5, 6, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), _luma(rgb), atol=1e-6)  # alpha ignored
    palette_image = Image.fromarray(rgb, mode="RGB").quantize(colors=8)
    palette_image.save(tmp_path / "p.png")
    expected = _luma(np.asarray(palette_image.convert("RGB")))
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), expected, atol=1e-6)


def test_bilevel_png(tmp_path: Path) -> None:
    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), bits.astype(np.float32))


def test_jpeg_8bit_gray(tmp_path: Path) -> None:
    flat = np.full((16, 16), 128, dtype=np.uint8)
    Image.fromarray(flat, mode="L").save(tmp_path / "a.jpg", quality=95)
    np.testing.assert_allclose(read_image(tmp_path / "a.jpg"), 128 / 255.0, atol=2 / 255)


def test_tiff_16bit_float_and_rgb(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", GRADIENT16)
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), GRADIENT16 / 65535.0, atol=1e-7)
    values = np.array([[2.0, 4.0], [6.0, 10.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tiff", values)
    np.testing.assert_allclose(read_image(tmp_path / "f.tiff"), [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)
    rgb = np.random.default_rng(1).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "rgb.tif"), _luma(rgb), atol=1e-6)


def test_truncated_png_names_file_and_reason(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: .*(truncated|corrupt)"):
        read_image(tmp_path / "cut.png")


def test_zero_byte_missing_and_non_image_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: the file is empty \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match=r"nope\.png: no such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"text\.png: not a recognised image format"):
        read_image(tmp_path / "text.png")


def test_read_mask_thresholds_at_half_the_maximum(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="L").save(tmp_path / "m01.png")
    Image.fromarray(np.array([[0, 255], [250, 3]], dtype=np.uint8), mode="L").save(tmp_path / "m255.png")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8), mode="L").save(tmp_path / "empty.png")
    expected = np.array([[False, True], [True, False]])
    np.testing.assert_array_equal(read_mask(tmp_path / "m01.png"), expected)
    np.testing.assert_array_equal(read_mask(tmp_path / "m255.png"), expected)
    assert not read_mask(tmp_path / "empty.png").any()


# --- DICOM --------------------------------------------------------------------------------------------------
STORED = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)


def test_dicom_monochrome2_16bit_is_min_max_stretched(tmp_path: Path) -> None:
    image = read_image(write_dicom(tmp_path / "a.dcm", STORED))
    np.testing.assert_allclose(image, STORED / 4095.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    image = read_image(write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1"))
    np.testing.assert_allclose(image, 1.0 - STORED / 4095.0, atol=1e-6)


def test_dicom_rescale_then_window(tmp_path: Path) -> None:
    slope, intercept, center, width = 2.0, -1024.0, 1000.0, 4001.0
    path = write_dicom(
        tmp_path / "w.dcm",
        STORED,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
    )
    hounsfield = STORED * slope + intercept
    expected = np.clip((hounsfield - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)
    assert read_image(path)[0, 0] == 0.0 and read_image(path)[1, 2] == 1.0  # clipped outside the window


def test_dicom_rescale_without_window_and_no_extension(tmp_path: Path) -> None:
    signed = np.array([[-500, 0], [250, 1500]], dtype=np.int16)
    path = write_dicom(tmp_path / "scan", signed, signed=True, RescaleSlope=0.5, RescaleIntercept=100.0)
    np.testing.assert_allclose(read_image(path), (signed + 500) / 2000.0, atol=1e-6)  # DICM magic, no suffix


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    lut_item = Dataset()
    lut_item.LUTDescriptor = [4, 0, 8]  # 4 entries, first stored value 0, 8-bit output
    lut_item.LUTData = np.array([0, 100, 200, 255], dtype=np.uint16).tobytes()
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[lut_item])
    np.testing.assert_allclose(read_image(path), np.array([[0, 100], [200, 255]]) / 255.0, atol=1e-6)


def test_dicom_multiframe_is_refused(tmp_path: Path) -> None:
    frames = np.stack([STORED, STORED])
    path = write_dicom(tmp_path / "mf.dcm", frames, NumberOfFrames=2)
    with pytest.raises(ImageReadError, match=r"mf\.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path)


def test_dicom_compressed_without_decoder_names_the_package(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ls.dcm", STORED)
    from pydicom import dcmread

    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 32])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(
        ImageReadError, match=r"ls\.dcm: compressed transfer syntax JPEG-LS.*pip install pyjpegls"
    ):
        read_image(path)


def test_truncated_dicom(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "t.dcm", np.zeros((64, 64), dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    with pytest.raises(ImageReadError, match=r"t\.dcm: "):
        read_image(path)
