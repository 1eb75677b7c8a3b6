"""Image files → float32 grayscale arrays [H, W] in [0, 1] (ARCHITECTURE §2).

Formats and how their values map to [0, 1]:

- PNG / JPEG / BMP (Pillow): 8-bit by 255, 16-bit by 65535 (no stretching, so relative brightness between
  files is kept); RGB, RGBA, LA and palette images become luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601,
  what Pillow's ``convert("L")`` uses), the alpha channel is ignored; bilevel images give 0 or 1. Pillow
  reduces 16-bit colour PNGs (RGB48, gray+alpha 16) to 8 bits per channel; 16-bit grayscale keeps all levels.
- TIFF (tifffile): integer types by their maximum (uint8 255, uint16 65535, uint32 2**32 - 1), signed
  integers and floats outside [0, 1] are min-max stretched; RGB(A) as above. Multi-page files are refused.
- DICOM (pydicom): the Modality LUT (rescale slope/intercept), then the VOI LUT or the window
  (center/width, first view) when the file has one, mapped from that transform's output range onto [0, 1];
  without a VOI transform the rescaled values are min-max stretched. ``MONOCHROME1`` (white = low values)
  is inverted so that bone is always bright. Multi-frame files and compressed transfer syntaxes without an
  installed decoder raise an error naming what to do.

Every failure is an ``ImageReadError`` whose message names the file and the reason. ``read_image(path,
notes)`` appends to ``notes`` what is readable but suspicious: a 16-bit PNG/TIFF whose maximum fits in 12
bits (12-bit detector values stored unscaled read as nearly black; DICOM declares its range in BitsStored,
which the VOI / min-max mapping honours, so DICOM is never flagged).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from evidrift.core.errors import EvidriftError

#: Suffixes recognised as images when scanning class folders (lower case).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

#: Transfer syntax UID prefix/value → the packages that decode it (for the "install ..." hint).
_DECODER_HINTS: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.2.4.50", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),  # JPEG baseline
    ("1.2.840.10008.1.2.4.51", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),  # JPEG extended
    ("1.2.840.10008.1.2.4.57", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),  # JPEG lossless
    ("1.2.840.10008.1.2.4.70", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),  # JPEG lossless SV1
    ("1.2.840.10008.1.2.4.80", "pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)"),  # JPEG-LS
    ("1.2.840.10008.1.2.4.81", "pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)"),
    ("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),  # JPEG 2000 family
    ("1.2.840.10008.1.2.4.201", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),  # HTJ2K
    ("1.2.840.10008.1.2.4.202", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    ("1.2.840.10008.1.2.4.203", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    ("1.2.840.10008.1.2.5", "pylibjpeg pylibjpeg-rle (or python-gdcm)"),  # RLE lossless
)


#: A 16-bit image whose maximum is below 2**LOW_DEPTH_BITS is flagged (``read_image``'s ``notes``).
LOW_DEPTH_BITS = 12


class ImageReadError(EvidriftError, ValueError):
    """An image file that cannot be read; the message names the file and the reason."""


def read_image(path: str | os.PathLike[str], notes: list[str] | None = None) -> np.ndarray:
    """Read one image as grayscale float32 [H, W] with values in [0, 1] (see the module doc for scaling).

    Raises ``ImageReadError`` (naming the file and why) for a missing, empty, truncated, corrupt or
    unsupported file. ``notes``: a list that receives one line per suspicious property (a 16-bit image using
    at most 12 bits), naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise ImageReadError(f"{file}: no such file")
    if file.stat().st_size == 0:
        raise ImageReadError(f"{file}: the file is empty (0 bytes); re-export or remove it")
    suffix = file.suffix.lower()
    try:
        if suffix in DICOM_SUFFIXES or _has_dicom_magic(file):
            image = _read_dicom(file)
        elif suffix in TIFF_SUFFIXES:
            image = _read_tiff(file)
            if notes is not None:
                _check_depth(file, notes)
        else:
            image = _read_pillow(file)
            if notes is not None:
                _check_depth(file, notes)
    except ImageReadError:
        raise
    except Exception as exc:  # every decoder error becomes one naming the file (chained, never swallowed)
        raise ImageReadError(f"{file}: cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{file}: expected a 2-D image, got an array of shape {image.shape}")
    if not np.isfinite(image).all():
        raise ImageReadError(f"{file}: the pixel values contain NaN or infinity")
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a lesion mask as bool [H, W]: pixels above half the file's maximum (so 0/1 and 0/255 masks and
    slightly lossy JPEG masks all work); an all-zero file is an empty mask. Raises ``ImageReadError``."""
    values = read_image(path)
    top = float(values.max())
    if top <= 0.0:
        return np.zeros(values.shape, dtype=bool)
    return values > 0.5 * top


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of an image in pixels (decodes the file; raises ``ImageReadError``)."""
    height, width = read_image(path).shape
    return int(height), int(width)


def _has_dicom_magic(file: Path) -> bool:
    """True when the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    with open(file, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a DICOM file by its content (the Part 10 ``DICM`` preamble), whatever its name
    (PACS exports often have no suffix). False for unreadable files."""
    try:
        return _has_dicom_magic(Path(path))
    except OSError:
        return False


def _sixteen_bit_max(file: Path) -> int | None:
    """The largest stored value of a 16-bit grayscale PNG/TIFF, or None for other images."""
    if file.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(file) as tif:
            if tif.pages[0].dtype != np.uint16:
                return None
            data = tif.asarray()
        return int(data.max()) if data.size else None
    from PIL import Image

    with Image.open(file) as opened:
        if not (opened.mode.startswith("I;16") or opened.mode == "I"):
            return None
        data = np.asarray(opened)
    if opened.mode == "I" and data.size and int(data.max()) > 65535:
        return None
    return int(data.max()) if data.size else None


def _check_depth(file: Path, notes: list[str]) -> None:
    """Append a note when a 16-bit image's maximum fits in ``LOW_DEPTH_BITS`` bits."""
    top = _sixteen_bit_max(file)
    if top is None or top >= 2**LOW_DEPTH_BITS:
        return
    bits = max(1, top.bit_length())
    notes.append(
        f"{file}: 16-bit image whose maximum {top} fits in {bits} bits, read as 0-{top / 65535:.3f} "
        f"(nearly black); if it holds {LOW_DEPTH_BITS}-bit values, scale them to 16 bits "
        f"(x{2 ** (16 - LOW_DEPTH_BITS)}) or export DICOM with BitsStored {LOW_DEPTH_BITS}"
    )


def _luma(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] (any numeric dtype) → float64 [H, W] luma in the same units."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _scale_to_unit(values: np.ndarray) -> np.ndarray:
    """Map an integer or float array onto [0, 1]: unsigned integers by their dtype maximum, bool as 0/1,
    signed integers and floats outside [0, 1] by min-max (a constant image becomes 0)."""
    if values.dtype == bool:
        return values.astype(np.float64)
    if np.issubdtype(values.dtype, np.unsignedinteger):
        return values.astype(np.float64) / float(np.iinfo(values.dtype).max)
    data = values.astype(np.float64)
    if np.issubdtype(values.dtype, np.floating) and data.size and data.min() >= 0.0 and data.max() <= 1.0:
        return data
    return _min_max(data)


def _min_max(data: np.ndarray) -> np.ndarray:
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    if high <= low:
        return np.zeros_like(data, dtype=np.float64)
    return (data - low) / (high - low)


def _read_pillow(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            opened.load()
            image: Image.Image = opened
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageReadError(f"{file}: has {frames} frames; export a single frame")
            mode = image.mode
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            elif mode == "PA":
                image = image.convert("RGBA")
                mode = image.mode
            if mode in {"RGB", "RGBA", "RGBX"}:
                return _luma(np.asarray(image)) / 255.0
            if mode in {"LA", "La"}:
                return np.asarray(image)[..., 0].astype(np.float64) / 255.0
            if mode in {"CMYK", "YCbCr", "LAB", "HSV"}:
                return _luma(np.asarray(image.convert("RGB"))) / 255.0
            if mode == "1":
                return np.asarray(image).astype(np.float64)
            if mode == "L":
                return np.asarray(image).astype(np.float64) / 255.0
            if mode.startswith("I;16"):
                return np.asarray(image).astype(np.float64) / 65535.0
            if mode == "I":
                data = np.asarray(image)
                if data.size and data.min() >= 0 and data.max() <= 65535:
                    return data.astype(np.float64) / 65535.0
                return _min_max(data.astype(np.float64))
            if mode == "F":
                return _scale_to_unit(np.asarray(image))
            raise ImageReadError(
                f"{file}: unsupported Pillow image mode {mode!r}; convert it to PNG (L or I;16)"
            )
    except UnidentifiedImageError as exc:
        raise ImageReadError(
            f"{file}: not a recognised image format (PNG, JPEG, TIFF, BMP or DICOM)"
        ) from exc
    except OSError as exc:
        raise ImageReadError(f"{file}: corrupt or truncated image ({exc})") from exc


def _read_tiff(file: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            if len(tif.pages) > 1 and len(tif.series) and tif.series[0].shape[0] == len(tif.pages) > 1:
                raise ImageReadError(f"{file}: has {len(tif.pages)} pages; export a single page")
            data = tif.asarray()
    except ImageReadError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ImageReadError(f"{file}: corrupt or unsupported TIFF ({exc})") from exc
    data = np.squeeze(data)
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        rgb = data[..., :3]
        if np.issubdtype(rgb.dtype, np.unsignedinteger):
            return _luma(rgb) / float(np.iinfo(rgb.dtype).max)
        return _min_max(_luma(rgb)) if not (rgb.min() >= 0 and rgb.max() <= 1) else _luma(rgb)
    if data.ndim != 2:
        raise ImageReadError(f"{file}: TIFF of shape {data.shape} is not a single grayscale or RGB image")
    return _scale_to_unit(data)


def _decoder_hint(transfer_syntax: str) -> str:
    for prefix, packages in _DECODER_HINTS:
        if transfer_syntax.startswith(prefix):
            return packages
    return "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def _decoder_available(transfer_syntax: object) -> bool:
    """True when pydicom has a working decoder plugin for ``transfer_syntax`` (unknown syntaxes: False)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(transfer_syntax).is_available)  # type: ignore[arg-type]
    except NotImplementedError:
        return False


def _voi_output_range(ds: object) -> tuple[float, float] | None:
    """Output range of the VOI transform ``pydicom.pixels.apply_voi_lut`` applies to ``ds`` (None if none).

    Mirrors pydicom: a VOI LUT Sequence outputs [0, 2**bits - 1] (bits = 3rd LUT Descriptor value); a window
    outputs [y_min, y_max] of the stored range (signed or not), passed through the rescale when present."""
    get = ds.get  # type: ignore[attr-defined]
    sequence = get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(sequence[0].LUTDescriptor[2]) - 1)
    if get("WindowCenter") is None or get("WindowWidth") is None:
        return None
    bits = int(ds.BitsStored)  # type: ignore[attr-defined]
    if get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)  # type: ignore[attr-defined]
    elif int(get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = get("RescaleSlope"), get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return (min(low, high), max(low, high))


def _read_dicom(file: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(file)
    except InvalidDicomError as exc:
        raise ImageReadError(f"{file}: not a valid DICOM file ({exc})") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise ImageReadError(f"{file}: corrupt or truncated DICOM ({exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{file}: the DICOM has no pixel data (is it a report or a presentation state?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            f"{file}: multi-frame DICOM ({frames} frames) is not supported; export the frame to classify as "
            "a single-frame DICOM or PNG"
        )
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if (
        transfer_syntax is not None
        and transfer_syntax.is_compressed
        and not _decoder_available(transfer_syntax)
    ):
        raise ImageReadError(
            f"{file}: compressed transfer syntax {transfer_syntax.name} ({transfer_syntax}) has no decoder "
            f"installed; install one with `pip install {_decoder_hint(str(transfer_syntax))}`"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except (RuntimeError, NotImplementedError, ImportError) as exc:
        raise ImageReadError(f"{file}: DICOM pixel data cannot be decoded ({exc})") from exc
    except (ValueError, EOFError) as exc:
        raise ImageReadError(f"{file}: corrupt or truncated DICOM pixel data ({exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                pixels = convert_color_space(pixels, photometric, "RGB")
            return _scale_to_unit(_luma(pixels).round().astype(pixels.dtype))
        raise ImageReadError(f"{file}: photometric interpretation {photometric} is not supported")
    if pixels.ndim != 2:
        raise ImageReadError(f"{file}: pixel array of shape {pixels.shape} is not a single grayscale frame")
    modality = np.asarray(apply_modality_lut(pixels, ds))
    if np.issubdtype(modality.dtype, np.floating) and np.array_equal(modality, np.round(modality)):
        modality = modality.astype(np.int64)  # a VOI LUT indexes by integer values
    values = modality.astype(np.float64)
    voi_range = _voi_output_range(ds)
    if voi_range is not None:
        values = np.asarray(apply_voi_lut(modality, ds), dtype=np.float64)
        low, high = voi_range
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        values = _min_max(values)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    return values
