"""Entry for Ray's own ``serve run serve/config.yaml``: the application lives in the installed package.

``import_path: serve.app:build_app`` resolves here; replicas import
``soup_ray.serving.app`` from the installed soup-ray, so nothing from this
folder has to reach them.
"""

from soup_ray.serving.app import app, build_app

__all__ = ["app", "build_app"]
