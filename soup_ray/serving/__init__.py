"""Serving the soup over HTTP with Ray Serve.

- ``options``: the application's arguments and a replica's ``user_config``
- ``images``: request bodies to model inputs (PNG/JPEG only, size limits)
- ``models``: loading the soup or a trial, the swap-whole ``ModelSlot``
- ``app``: the deployments and ``build_app`` (imports Ray Serve; not imported here)
- ``launch``: ``serve_run`` and a clean stop

``serve/app.py`` in the repository is a thin entry for Ray's own
``serve run serve/config.yaml``; replicas import this installed package.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; loaded on first use, so a Serve replica that imports one light module (the ingress) does
# not pay for torch and open_clip through this package
_EXPORTS = {
    **dict.fromkeys(
        [
            "ACCEPTED_FORMATS",
            "ImageError",
            "decode_image",
            "image_from_json",
            "load_image",
            "sniff_format",
            "to_model_input",
            "top_predictions",
        ],
        "images",
    ),
    **dict.fromkeys(["serve_run", "sigterm_as_interrupt", "stop_serve_and_ray"], "launch"),
    **dict.fromkeys(
        [
            "LoadedModel",
            "ModelSlot",
            "ModelUnavailable",
            "check_model",
            "ensemble_members",
            "load_model",
            "resolve_run_dir",
            "resolve_trial",
            "soup_folder",
            "soup_stamp",
            "stamp_of",
        ],
        "models",
    ),
    **dict.fromkeys(
        ["APP_NAME", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_PIXELS", "SOUP_MODEL", "ModelSpec", "ServeOptions"],
        "options",
    ),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
