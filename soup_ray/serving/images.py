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

from .options import DEFAULT_MAX_PIXELS

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


def _to_8bit(img: Any) -> Any:
    """A Pillow image in a mode ``convert('RGB')`` handles without clipping (16-bit grey is rescaled)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    return img


def load_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG or JPEG bytes -> ``uint8`` array ``[image_size, image_size, 3]`` (RGB, bilinear resize).

    Raises ``ImageError``: 400 empty body, not an image, truncated or corrupt
    image; 415 another image format (GIF, BMP, TIFF, WebP, ...); 422 more than
    ``max_pixels`` pixels (checked from the header, before anything is decoded).
    Grey images become three equal channels; alpha is dropped; no inversion.
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
                raise ImageError(422, "too_many_pixels", f"the image is {width}x{height} = {width * height} pixels; "
                                                         f"at most {max_pixels} are accepted")
            img.load()
            img = ImageOps.exif_transpose(img) if fmt == "JPEG" else img
            rgb = _to_8bit(img).convert("RGB")
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


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """PNG or JPEG bytes -> float tensor ``[3, S, S]`` in [0, 1], exactly as the server feeds the model."""
    return to_model_input([load_image(data, image_size, max_pixels)])[0]


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
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(400, "invalid_base64", f'"image_base64" is not valid base64: {err}') from None
    if not data:
        raise ImageError(400, "empty_body", '"image_base64" decodes to no bytes')
    return data


def top_predictions(logits: Sequence[float], classnames: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes by probability (softmax of the logits, float32), best first."""
    z = np.asarray(list(logits), dtype=np.float32)
    e = np.exp(z - z.max())
    probs = e / e.sum()
    k = max(1, min(int(top_k), probs.size))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": classnames[i], "index": int(i), "probability": float(probs[i])} for i in order.tolist()]
