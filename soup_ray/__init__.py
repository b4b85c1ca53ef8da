"""soup-ray as a library: fine-tune a CLIP model many times with Ray Tune, keep the greedy soup, load it.

Three calls, for notebooks and scripts (the ``soup-ray`` command runs the same code)::

    import soup_ray

    run_dir = soup_ray.run("tune_configs/local.yaml", overrides={"tune.num_samples": 4})
    soup_ray.soup(run_dir, method="uniform")            # another recipe from the same checkpoints
    loaded = soup_ray.load_soup(run_dir / "soup")       # the greedy soup, ready to classify
    loaded.predict([open("digit.png", "rb").read()])    # [[{"label": ..., "probability": ...}, ...]]

``import soup_ray`` stays light: torch, open_clip and Ray are imported by the
calls, not here. This module is the package's facade: it is the one module
that may reach the pipelines (``soup_ray.jobs``) and the image decoding of the
server (``soup_ray.serving.images``), and only from inside its functions.
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import SweepConfig

__all__ = ["run", "soup", "load_soup", "LoadedSoup"]


def _sweep_config(config: Any, overrides: dict[str, Any] | None) -> SweepConfig:
    """A validated config from a YAML path, a mapping or a ``SweepConfig``, with dotted ``overrides`` applied."""
    from .config import ConfigError, SweepConfig, load_config, parse_config

    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, SweepConfig):
        data = config.model_dump(mode="json")
    elif isinstance(config, dict):
        data = copy.deepcopy(config)
    else:
        raise TypeError(f"config must be a YAML file path, a mapping or a SweepConfig, not {type(config).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {key} is a single value, not a section with keys")
        node[last] = value
    return parse_config(data, "<config>")


def run(
    config: Any,
    out: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run a sweep with the live greedy soup, then score and report it; returns the run folder.

    ``config``: a sweep YAML path (``tune_configs/local.yaml``), a mapping of the
    same keys or a ``soup_ray.config.SweepConfig``; ``overrides``: dotted keys
    (``{"tune.num_samples": 4}``). An invalid config raises
    ``soup_ray.config.ConfigError`` naming each problem before Ray starts. Ray
    runs embedded unless the config's ``ray.address`` (or ``RAY_ADDRESS``) names a
    cluster. Serving is separate: ``soup-ray serve RUN_DIR``.
    """
    cfg = _sweep_config(config, overrides)
    from .jobs import log_line, sweep_job

    return Path(sweep_job(cfg, None if out is None else str(out), log=log or log_line).run_dir)


def soup(
    run_dir: str | Path,
    method: str = "greedy",
    *,
    params: dict[str, Any] | None = None,
    tie: str | None = None,
    early_rejection: bool = True,
    report: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compute a soup recipe from a finished run's checkpoints; returns its ingredients, held-out score and folder.

    ``method``: a registered recipe (``greedy``, ``uniform``, ``wise_ft``,
    ``model_stock``, ``ties``, ...; ``soup-ray soup --help`` lists them with their
    parameters), ``params`` its options. The recipe is written to
    ``RUN_DIR/soups/METHOD/`` (load it with :func:`load_soup`) with its row in
    ``results.jsonl``; ``report=True`` rewrites the whole report too.
    """
    from .jobs import log_line, recompute_soup
    from .run_dir import RunDir

    out = recompute_soup(
        Path(run_dir),
        method,
        tie=tie,
        early_rejection=early_rejection,
        report=report,
        log=log or log_line,
        options=dict(params or {}),
    )
    out.setdefault("folder", str(RunDir(run_dir).recipe(method)))
    return out


@dataclass
class LoadedSoup:
    """A loaded soup: the classifier (eval mode), its class names, and the server's image decoding."""

    model: torch.nn.Module
    classnames: list[str]
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def preprocess(self, image: Any) -> torch.Tensor:
        """One image (PNG/JPEG bytes, a file path or a PIL image) as the model's input ``[3, S, S]`` in [0, 1],
        decoded exactly as ``POST /predict`` decodes it."""
        from .serving.images import decode_image

        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        elif isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
        else:  # a PIL image: through PNG, so grey, 16-bit and alpha are handled as the server handles them
            import io

            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        return decode_image(data, self.image_size)

    def predict(self, images: list[Any], top_k: int = 3) -> list[list[dict[str, Any]]]:
        """The top-``top_k`` classes of each image, as ``/predict`` answers them (label, index, probability)."""
        import torch

        from .serving.images import top_predictions

        x = torch.stack([self.preprocess(im) for im in images])
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(x.to(device)).float().cpu()
        return [top_predictions(row.tolist(), self.classnames, top_k) for row in logits]


class _NotRandomInit:
    """A logging filter for open_clip's "Model initialized randomly" warning on a ``local-dir:`` folder, whose
    weights are loaded right after (the soup's own tensors, checked by the API test's accuracy)."""

    def filter(self, record: Any) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_soup(path: str | Path, device: str = "cpu") -> LoadedSoup:
    """Load a published soup or recipe folder (``RUN_DIR/soup``, ``RUN_DIR/soups/NAME``, ``soup_versions/vNNNN``;
    a run folder means its ``soup/``) as a classifier in eval mode with its class names."""
    from .export import load_soup as load_folder
    from .run_dir import SOUP_INFO, RunDir

    folder = Path(path)
    if not (folder / SOUP_INFO).is_file() and RunDir(folder).soup_info.is_file():
        folder = RunDir(folder).soup
    if not (folder / SOUP_INFO).is_file():
        raise FileNotFoundError(
            f"{folder}: no {SOUP_INFO} here, so it is not a published soup folder (give "
            "RUN_DIR/soup, RUN_DIR/soups/NAME or a run folder with a soup)"
        )
    import logging

    root = logging.getLogger()
    quiet = _NotRandomInit()
    root.addFilter(quiet)  # open_clip's local-dir factory warns "initialized randomly" before its weights load
    try:
        model, info = load_folder(folder, device=device)
    finally:
        root.removeFilter(quiet)
    return LoadedSoup(
        model=model.eval(), classnames=list(info["classnames"]), image_size=int(info["image_size"]), info=info
    )


class _SoupModule(types.ModuleType):
    """``soup_ray.soup`` is both the soup-mathematics package and the :func:`soup` call.

    Importing the sub-package ``soup_ray.soup`` rebinds the name on this
    package to the module; its class is switched to this one so that the name
    stays callable as documented (``soup_ray.soup(run_dir, method=...)``) and
    every module attribute (``soup_ray.soup.greedy_soup``, ...) stays as it is.
    """

    def __call__(self, run_dir: str | Path, method: str = "greedy", **kwargs: Any) -> dict[str, Any]:
        return _soup_call(run_dir, method, **kwargs)


class _Package(types.ModuleType):
    """This package's module type: keeps ``soup_ray.soup`` callable once the sub-package is imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "soup" and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _SoupModule
        super().__setattr__(name, value)


_soup_call = soup
_package = sys.modules[__name__]
_package.__class__ = _Package
if isinstance(sys.modules.get(f"{__name__}.soup"), types.ModuleType):  # imported before this line ran
    _package.soup = sys.modules[f"{__name__}.soup"]
