"""Request bodies to model inputs: PNG/JPEG sniffing, size limits, decoding, base64 JSON, top-k answers.

``load_image`` turns PNG or JPEG bytes into the model's input (RGB, resized
with bilinear filtering to the model's ``image_size``), refusing everything
else with an ``ImageError`` that carries an HTTP status and an error code.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .options import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # torch is imported lazily: the HTTP ingress never needs it
    import torch

ACCEPTED_FORMATS = ("PNG", "JPEG")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class ImageError(ValueError):
    """A request body that cannot be turned into a model input; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


def sniff_format(data: bytes) -> str | None:
    """'PNG' or 'JPEG' from the first bytes, else None."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def _identify(data: bytes) -> str | None:
    """The format Pillow recognises in a non-PNG/JPEG body (header only), or None when it is no image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format or "unknown")
    except Image.DecompressionBombError:
        return "oversized image"
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image
        return None


# PNG colour type -> samples per pixel (grey, -, RGB, palette, grey+alpha, -, RGBA)
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# 16-bit sample -> 8-bit, round(v / 257) exactly, as a lookup table (no float copy of the image)
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def declared_bytes_per_pixel(data: bytes, img: Any) -> int:
    """Bytes one pixel takes as the image's header declares it (samples x bytes per sample).

    PNG: from IHDR (a 16-bit RGBA pixel is 8 bytes); otherwise from the bands
    of the mode Pillow reads from the header (a JPEG pixel is 1 byte per band).
    """
    if data.startswith(PNG_MAGIC) and len(data) >= 26 and data[12:16] == b"IHDR":
        depth, colour = data[24], data[25]
        return PNG_SAMPLES.get(colour, 4) * (2 if depth == 16 else 1)
    bands = len(img.getbands())
    wide = img.mode.startswith("I;16") or img.mode in ("I", "F")
    return bands * (4 if img.mode in ("I", "F") else 2 if wide else 1)


def _to_8bit(img: Any) -> Any:
    """A Pillow image in a mode ``convert('RGB')`` handles without clipping (16-bit grey is rescaled).

    16-bit grey goes through a 64K-entry table: one uint16 copy and one uint8
    result, never a float copy of the whole image.
    """
    from PIL import Image

    if img.mode.startswith("I;16"):
        return Image.fromarray(_SIXTEEN_TO_EIGHT[np.asarray(img)], "L")
    if img.mode == "I":
        return img.point(lambda v: v * (1 / 257) + 0.5).convert("L")
    return img


def load_image(
    data: bytes,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> np.ndarray:
    """PNG or JPEG bytes -> ``uint8`` array ``[image_size, image_size, 3]`` (RGB, bilinear resize).

    Raises ``ImageError``: 400 empty body, not an image, truncated or corrupt
    image; 415 another image format (GIF, BMP, TIFF, WebP, ...); 422 more than
    ``max_pixels`` pixels or more than ``max_decoded_bytes`` decoded (width x
    height x the header's bytes per pixel), both checked from the header,
    before anything is decoded. Grey images become three equal channels
    (resized while still grey: the same result, a third of the memory); alpha
    is dropped; no inversion.
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageError(400, "empty_body", "the request carried no image bytes")
    fmt = sniff_format(data)
    if fmt is None:
        other = _identify(data)
        if other is None:
            raise ImageError(400, "not_an_image", "the body is not a PNG or JPEG image (unrecognised bytes)")
        raise ImageError(415, "unsupported_image_type", f"{other} images are not accepted; send PNG or JPEG")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(400, "corrupt_image", f"the {fmt} image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    422,
                    "too_many_pixels",
                    f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted",
                )
            per_pixel = declared_bytes_per_pixel(data, img)
            if width * height * per_pixel > max_decoded_bytes:
                raise ImageError(
                    422,
                    "too_large_decoded",
                    f"the {width}x{height} image decodes to {width * height * per_pixel} bytes "
                    f"({per_pixel} per pixel); at most {max_decoded_bytes} are accepted",
                )
            img.load()
            img = ImageOps.exif_transpose(img) if fmt == "JPEG" else img
            img = _to_8bit(img)
            if img.mode == "L" and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            rgb = img.convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(422, "too_many_pixels", f"the image is too large to decode safely: {err}") from None
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise ImageError(400, "corrupt_image", f"the {fmt} image is truncated or corrupt: {err}") from None


def to_model_input(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``uint8`` arrays ``[S, S, 3]`` -> float tensor ``[N, 3, S, S]`` in [0, 1] (what ``CLIPClassifier`` takes)."""
    import torch

    x = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in images]))
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def decode_image(
    data: bytes,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> torch.Tensor:
    """PNG or JPEG bytes -> float tensor ``[3, S, S]`` in [0, 1], exactly as the server feeds the model."""
    return to_model_input([load_image(data, image_size, max_pixels, max_decoded_bytes)])[0]


def image_from_json(body: bytes) -> bytes:
    """The image bytes of a JSON body ``{"image_base64": "..."}`` (a ``data:`` URL prefix is allowed)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(400, "malformed_json", f"the JSON body cannot be parsed: {err}") from None
    if not isinstance(payload, dict) or "image_base64" not in payload:
        raise ImageError(422, "missing_field", 'the JSON body must be an object with an "image_base64" string')
    text = payload["image_base64"]
    if not isinstance(text, str):
        raise ImageError(422, "invalid_field", '"image_base64" must be a string')
    return base64_image(text)


def base64_image(text: str) -> bytes:
    """The image bytes of one base64 string (a ``data:`` URL prefix is allowed); 400 when invalid or empty."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(400, "invalid_base64", f"the image is not valid base64: {err}") from None
    if not data:
        raise ImageError(400, "empty_body", "the base64 image decodes to no bytes")
    return data


def top_predictions(logits: Sequence[float], classnames: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes by probability (softmax of the logits, float32), best first."""
    z = np.asarray(list(logits), dtype=np.float32)
    e = np.exp(z - z.max())
    probs = e / e.sum()
    k = max(1, min(int(top_k), probs.size))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": classnames[i], "index": int(i), "probability": float(probs[i])} for i in order.tolist()]
