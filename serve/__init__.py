"""The Ray Serve application of soup-ray (``serve run serve/config.yaml`` from the repository root).

``serve.app:build_app`` builds the application from ``soup_ray.serving.ServeOptions``
arguments; ``soup_ray.serving.serve_run`` deploys it from Python.
"""

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(name)
