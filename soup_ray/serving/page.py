"""The live soup page for the serving side: the same page and server as :mod:`soup_ray.live_page`.

The rendering and the standard-library page server live in the core module
``soup_ray.live_page`` (no Ray, torch or FastAPI there, so a sweep driver can
start the page cheaply); the Serve ingress renders ``GET /`` with the same code.
"""

from ..live_page import DEFAULT_POLL_S, JSON_PATH, render_page, start_live_page

__all__ = ["DEFAULT_POLL_S", "JSON_PATH", "render_page", "start_live_page"]
