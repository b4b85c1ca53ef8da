"""The Ray Serve entry of soup-ray for ``serve run serve/config.yaml`` (run from the repository root)."""
