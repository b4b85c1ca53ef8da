"""Every name in a run folder, in one place.

```
RUN_DIR/
  config.json                       the validated config of the run
  base/                             the shared initialisation, saved once
    model.safetensors, base.json, zero_shot.json,
    open_clip_model.safetensors, open_clip_config.json
  tune/                             Ray Tune's experiment folder
    <trial>/checkpoint_NNNNNN/      model.safetensors, logits.safetensors, metrics.json
  results.jsonl                     one row per model, then the summary rows
  soup/                             the latest greedy soup (open_clip local-dir + soup.json)
  soup_versions/vNNNN/              the last few published soup versions
  soup_state/state.json, inbox/     the soup actor's persisted state and unprocessed offers
  report.md, figure.png, greedy.png, interpolation.png   the report
  soups/<method>/                   computed recipes (open_clip local-dir + soup.json)
```

Modules take file names from here (the constants) or a :class:`RunDir`
(paths); nothing else spells them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
TIMINGS_FILE = "timings.json"
BASE_DIR = "base"
TUNE_DIR = "tune"
SOUP_DIR = "soup"
VERSIONS_DIR = "soup_versions"
STATE_DIR = "soup_state"
STATE_FILE = "state.json"
INBOX_DIR = "inbox"
SOUPS_DIR = "soups"
EPOCHS_DIR = "epochs"
SCHEDULER_LOG = "scheduler.jsonl"
REPORT_MD = "report.md"
FIGURE_PNG = "figure.png"
GREEDY_PNG = "greedy.png"
INTERPOLATION_PNG = "interpolation.png"
WISE_FT_PNG = "wise_ft.png"

WEIGHTS_FILE = "model.safetensors"
"""Classifier weights (image tower + head): in ``base/`` and in every trial checkpoint."""
BASE_META = "base.json"
ZERO_SHOT_FILE = "zero_shot.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
SOUP_INFO = "soup.json"
HEAD_FILE = "classifier_head.safetensors"
CHECKPOINT_LOGITS = "logits.safetensors"
CHECKPOINT_METRICS = "metrics.json"
TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def plain_name(name: str, what: str = "name") -> str:
    """``name`` when it can name one folder inside a run folder's sub-folder (letters, digits, ``.``, ``_``,
    ``-``; starting with a letter or digit; at most 100 characters); a ``ValueError`` saying so otherwise.

    A recipe label becomes ``soups/LABEL/``, which the export replaces whole: ``../base`` would replace the base.
    """
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a plain name: use letters, digits, '.', '_' and '-', starting with "
            "a letter or digit (no '/', no '..', at most 100 characters)"
        )
    return name


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    path: Path

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def timings(self) -> Path:
        return self.path / TIMINGS_FILE

    @property
    def base(self) -> Path:
        return self.path / BASE_DIR

    @property
    def base_meta(self) -> Path:
        return self.base / BASE_META

    @property
    def zero_shot(self) -> Path:
        return self.base / ZERO_SHOT_FILE

    @property
    def tune(self) -> Path:
        return self.path / TUNE_DIR

    @property
    def soup(self) -> Path:
        return self.path / SOUP_DIR

    @property
    def soup_info(self) -> Path:
        return self.soup / SOUP_INFO

    @property
    def versions(self) -> Path:
        return self.path / VERSIONS_DIR

    def version(self, number: int) -> Path:
        """``soup_versions/vNNNN``."""
        return self.versions / f"v{int(number):04d}"

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def inbox(self) -> Path:
        return self.state_dir / INBOX_DIR

    @property
    def soups(self) -> Path:
        return self.path / SOUPS_DIR

    def recipe(self, method: str) -> Path:
        """``soups/NAME``: a computed recipe as an open_clip local-dir folder (NAME a :func:`plain_name`)."""
        return self.soups / plain_name(method, "recipe label")

    @property
    def epochs(self) -> Path:
        """``epochs/TRIAL/eNNN``: every epoch's soup candidate (``tune.keep_epoch_candidates``)."""
        return self.path / EPOCHS_DIR

    def epoch_candidate(self, trial_id: str, epoch: int) -> Path:
        return self.epochs / plain_name(trial_id, "trial id") / f"e{int(epoch):03d}"

    @property
    def scheduler_log(self) -> Path:
        """``scheduler.jsonl``: every rung decision of the ``asha`` or ``soup`` scheduler, one JSON line each."""
        return self.path / SCHEDULER_LOG

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def figure(self) -> Path:
        return self.path / FIGURE_PNG

    @property
    def greedy_png(self) -> Path:
        return self.path / GREEDY_PNG

    def is_run(self) -> bool:
        """Whether the folder holds a saved base (what every reader of a run needs)."""
        return self.base.is_dir()
