"""Serving the soup over HTTP with Ray Serve.

- ``options``: the application's arguments and a replica's ``user_config``
- ``images``: request bodies to model inputs (PNG/JPEG only, size limits)
- ``models``: loading the soup or a trial, the swap-whole ``ModelSlot``
- ``app``: the deployments and ``build_app`` (imports Ray Serve; not imported here)
- ``launch``: ``serve_run`` and a clean stop

``serve/app.py`` in the repository is a thin entry for Ray's own
``serve run serve/config.yaml``; replicas import this installed package.
"""

from .images import (ACCEPTED_FORMATS, ImageError, decode_image, image_from_json, load_image, sniff_format,
                     to_model_input, top_predictions)
from .launch import serve_run, sigterm_as_interrupt, stop_serve_and_ray
from .models import (LoadedModel, ModelSlot, ModelUnavailable, check_model, ensemble_members, load_model,
                     resolve_run_dir, resolve_trial, soup_folder, soup_stamp, stamp_of)
from .options import APP_NAME, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PIXELS, SOUP_MODEL, ModelSpec, ServeOptions

__all__ = [
    "ACCEPTED_FORMATS", "ImageError", "decode_image", "image_from_json", "load_image", "sniff_format",
    "to_model_input", "top_predictions", "serve_run", "sigterm_as_interrupt", "stop_serve_and_ray",
    "LoadedModel", "ModelSlot", "ModelUnavailable", "check_model", "ensemble_members", "load_model",
    "resolve_run_dir", "resolve_trial", "soup_folder", "soup_stamp", "stamp_of",
    "APP_NAME", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_PIXELS", "SOUP_MODEL", "ModelSpec", "ServeOptions",
]
