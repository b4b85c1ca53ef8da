"""From finished trials to soup ingredients: checkpoint checks, weight loading, held-out scoring.

The pure algorithms in ``soup/`` see only ids and correct counts; this module
connects them to real checkpoints: it validates a trial's safetensors file
against the shared base (fingerprint, keys, shapes, finite values), averages
weights from disk, and scores a soup on the held-out split with early
rejection. The soup actor and ``soup-ray soup`` both use it, so the live and the
offline soups are computed the same way.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from .checkpoint_average import average_checkpoints, read_header
from .data import labels_of, loader
from .evaluate import pick_device, scoring_autocast
from .model import CLIPClassifier, load_base
from .run_dir import CHECKPOINT_LOGITS, CHECKPOINT_METRICS, RESULTS_FILE, RunDir
from .run_dir import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from .soup import Candidate, EvalResult, SoupError, early_rejection_evaluate
from .soup.base import key_set_difference

StateDict = dict[str, torch.Tensor]


class CheckpointRejected(ValueError):
    """A checkpoint that cannot join the soup; ``reason`` says why."""


class CheckpointUnavailable(CheckpointRejected):
    """A checkpoint that cannot be read *yet* (not visible on a network mount, an I/O error): worth retrying."""


class IngredientUnreadable(CheckpointUnavailable):
    """An admitted ingredient whose weights cannot be read as admitted any more (moved, deleted, rewritten)."""

    def __init__(self, trial_id: str, reason: str):
        super().__init__(f"the weights of {trial_id} cannot be read any more: {reason}")
        self.trial_id = trial_id


@dataclass(frozen=True)
class TrialRecord:
    """What the soup needs to know about one finished trial."""

    trial_id: str
    checkpoint: str  # folder with model.safetensors, logits.safetensors, metrics.json
    heldout_correct: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "checkpoint": self.checkpoint, "heldout_correct": self.heldout_correct}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrialRecord:
        return cls(str(d["trial_id"]), str(d["checkpoint"]), d.get("heldout_correct"))


def read_checkpoint(
    record: TrialRecord, base_fingerprint: str, reference: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> tuple[StateDict, int]:
    """Load and check one trial's weights; returns ``(state_dict, heldout_correct)`` or raises ``CheckpointRejected``."""
    folder = Path(record.checkpoint)
    path = folder / CHECKPOINT_WEIGHTS
    if not path.is_file():
        raise CheckpointUnavailable(f"no {CHECKPOINT_WEIGHTS} in {folder} (yet)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except OSError as err:
        raise CheckpointUnavailable(f"cannot read {path}: {err}") from None
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointRejected(f"unreadable checkpoint {path}: {err}") from None
    fp = meta.get("base_fingerprint")
    if fp != base_fingerprint:
        raise CheckpointRejected(
            f"base fingerprint {str(fp)[:12]} differs from this run's base {base_fingerprint[:12]}: "
            "it was fine-tuned from another initialisation"
        )
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise CheckpointRejected(f"keys do not match the base: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, (shape, dtype) in reference.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointRejected(f"shape of {k} is {tuple(state[k].shape)}, the base has {shape}")
        if state[k].dtype != dtype:
            raise CheckpointRejected(f"dtype of {k} is {state[k].dtype}, the base has {dtype}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointRejected(f"non-finite values (NaN/inf) in {bad[:5]}")
    correct = record.heldout_correct
    if correct is not None and (isinstance(correct, bool) or not isinstance(correct, int)):
        raise CheckpointRejected(f"held-out correct count {correct!r} of {record.trial_id} is not a whole number")
    if correct is None:
        mpath = folder / CHECKPOINT_METRICS
        try:
            correct = int(json.loads(mpath.read_text())["heldout_correct"])
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointRejected(f"no held-out score for {record.trial_id} in {mpath}: {err}") from None
    return state, int(correct)


class Kitchen:
    """The run's base, held-out split and a bounded cache of ingredient weights."""

    def __init__(
        self, run_dir: Path, eval_batch_size: int = 256, cache_bytes: int | None = None, threads: int | None = None
    ):
        from .config import SweepConfig
        from .data import build_dataset

        self.run_dir = Path(run_dir)
        if threads:
            torch.set_num_threads(threads)
        paths = RunDir(self.run_dir)
        cfg = SweepConfig.model_validate_json(paths.config.read_text())
        self.config = cfg
        self.model, self.base_meta = load_base(paths.base)
        self.device = pick_device(cfg.soup.resources.gpu)
        self.model.to(self.device).eval()
        self.fingerprint: str = self.base_meta["fingerprint"]
        self.reference = {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}
        self.num_workers = getattr(cfg.data, "num_workers", 0)
        self.bundle = build_dataset(cfg.data, int(self.base_meta["image_size"]))
        self.heldout = self.bundle.heldout
        self.heldout_size = len(self.heldout)
        self.eval_batch_size = eval_batch_size
        self.heldout_batch_size = cfg.soup.heldout_batch_size
        self.hardest_first = cfg.soup.hardest_first
        self.heldout_labels = labels_of(self.heldout)
        # how many admitted candidates get each held-out image wrong (from their cached logits)
        self.wrong_counts = torch.zeros(self.heldout_size, dtype=torch.long)
        self.paths: dict[str, TrialRecord] = {}
        self._cache: OrderedDict[str, StateDict] = OrderedDict()
        self._cache_bytes = int(cache_bytes if cache_bytes is not None else cfg.soup.cache_mb * 2**20)
        self._base_state: StateDict | None = None
        self._heldout_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.images_evaluated = 0

    # -- ingredients ---------------------------------------------------------

    def admit(self, record: TrialRecord) -> Candidate:
        """Check a trial's checkpoint and turn it into a soup candidate (raises ``CheckpointRejected``)."""
        state, correct = read_checkpoint(record, self.fingerprint, self.reference)
        if not 0 <= correct <= self.heldout_size:
            raise CheckpointRejected(
                f"held-out correct count {correct} of {record.trial_id} is outside "
                f"[0, {self.heldout_size}] (another held-out split?)"
            )
        self.paths[record.trial_id] = record
        self._remember(record.trial_id, state)
        self._count_mistakes(Path(record.checkpoint))
        return Candidate(record.trial_id, correct, load=lambda tid=record.trial_id: self.weights(tid))

    def _count_mistakes(self, folder: Path) -> None:
        try:
            with safe_open(str(folder / CHECKPOINT_LOGITS), "pt") as f:
                logits = f.get_tensor("heldout")
        except (SafetensorError, OSError, KeyError, RuntimeError):
            return  # ordering is only a speed-up; without cached logits the image order stays as it is
        if logits.shape[0] == self.heldout_size:
            self.wrong_counts += (logits.argmax(1) != self.heldout_labels).long()

    def heldout_order(self) -> torch.Tensor:
        """The order held-out images are scored in: most often misclassified first (ties by index).

        Any order gives the same decisions (early rejection only stops once the
        soup is certainly worse); putting likely mistakes first makes it stop sooner.
        """
        idx = torch.arange(self.heldout_size)
        if not self.hardest_first:
            return idx
        return idx[torch.argsort(-self.wrong_counts, stable=True)]

    def weights(self, trial_id: str) -> StateDict:
        """One ingredient's weights (from the cache or from disk)."""
        if trial_id in self._cache:
            self._cache.move_to_end(trial_id)
            return self._cache[trial_id]
        state = load_file(str(Path(self.paths[trial_id].checkpoint) / CHECKPOINT_WEIGHTS))
        self._remember(trial_id, state)
        return state

    def _remember(self, trial_id: str, state: StateDict) -> None:
        """Keep recently used weights, least recently used out first, within ``soup.cache_mb`` (the newest stays)."""
        self._cache[trial_id] = state
        self._cache.move_to_end(trial_id)
        while len(self._cache) > 1 and self.cache_bytes_used() > self._cache_bytes:
            self._cache.popitem(last=False)

    def cache_bytes_used(self) -> int:
        """Bytes of the ingredient weights held in memory."""
        return sum(t.numel() * t.element_size() for state in self._cache.values() for t in state.values())

    def soup_weights(self, ids: list[str], into: StateDict | None = None) -> StateDict:
        """The uniform average of the given ingredients' weights (fp32 accumulation), optionally written ``into``.

        Cached ingredients are read from memory, the others from their
        checkpoint tensor by tensor
        (:func:`soup_ray.checkpoint_average.average_checkpoints`, equal to
        ``average_state_dicts`` bit for bit), so a soup of many ingredients never
        holds more than the result and two tensor-sized buffers besides the cache.
        An ingredient whose file no longer matches what was admitted (deleted,
        moved, rewritten with other keys, shapes or dtypes, truncated) is named
        by an :class:`IngredientUnreadable`.
        """
        sources = [self._cache[t] if t in self._cache else self._weights_file(t) for t in ids]
        try:
            return average_checkpoints(sources, into=into)
        except (OSError, SoupError) as err:
            for t in ids:
                problem = None if t in self._cache else weights_file_problem(self._weights_file(t), self.reference)
                if problem is not None:
                    raise IngredientUnreadable(t, problem) from err
            raise

    def _weights_file(self, trial_id: str) -> Path:
        return Path(self.paths[trial_id].checkpoint) / CHECKPOINT_WEIGHTS

    def classifier(self, ids: list[str]) -> CLIPClassifier:
        """The base classifier loaded with the soup of ``ids`` (averaged straight into its weights)."""
        self.soup_weights(ids, into=self.model.state_dict())
        return self.model

    # -- scoring ---------------------------------------------------------------

    def heldout_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out images and labels, decoded once and kept in memory.

        Images that are whole multiples of 1/255 (decoded image files) are kept
        as uint8 and divided again per batch, which gives back the same floats
        in a quarter of the memory.
        """
        if self._heldout_tensors is None:
            if isinstance(self.heldout, TensorDataset):
                x, y = self.heldout.tensors[0], self.heldout.tensors[1]
            else:
                parts = list(loader(self.heldout, 256, num_workers=self.num_workers))
                x = torch.cat([p[0] for p in parts])
                y = torch.cat([torch.as_tensor(p[1]) for p in parts])
                u8 = (x * 255).round().clamp_(0, 255).to(torch.uint8)
                if torch.equal(u8.float().div_(255), x):
                    x = u8
            self._heldout_tensors = (x.contiguous(), y.long())
        return self._heldout_tensors

    def _batches(self, model: CLIPClassifier) -> Iterator[tuple[int, int]]:
        """``(correct, size)`` per held-out batch in :meth:`heldout_order`, computed only when pulled.

        Inference mode, the decoded tensors indexed in place, channels-last on
        a GPU and the autocast of :func:`soup_ray.evaluate.scoring_autocast`
        (bf16 on a GPU when the trials train in bf16): the one the trials' own
        held-out counts are computed under, so the soup is scored as its
        ingredients were.
        """
        x_all, y_all = self.heldout_tensors()
        order = self.heldout_order()
        natural = bool(torch.equal(order, torch.arange(len(order))))
        cuda = self.device == "cuda"
        precision = self.config.model.precision
        model.eval()
        if cuda:
            model.to(memory_format=torch.channels_last)
        bs = self.heldout_batch_size
        for start in range(0, len(order), bs):
            if natural:
                xb, yb = x_all[start : start + bs], y_all[start : start + bs]
            else:
                idx = order[start : start + bs]
                xb, yb = x_all.index_select(0, idx), y_all.index_select(0, idx)
            with torch.inference_mode(), scoring_autocast(self.device, precision):
                xb = xb.to(self.device, non_blocking=True)
                xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
                if cuda:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                pred = model(xb).argmax(1)
                correct = int((pred.cpu() == yb).sum())
            yield correct, len(yb)

    def base_state(self) -> StateDict:
        """The shared base's weights (read from ``base/`` once)."""
        if self._base_state is None:
            base, _ = load_base(RunDir(self.run_dir).base)
            self._base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        return self._base_state

    def heldout_loss_and_grad(self, state: StateDict) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean cross-entropy of ``state`` on the held-out split and its gradient with respect to every weight.

        What the learned soup descends on; the held-out images are scored in
        batches and the gradients summed, so memory holds one batch at a time.
        """
        from torch.func import functional_call

        params = {k: v.detach().to(self.device).requires_grad_(v.is_floating_point()) for k, v in state.items()}
        total, n = 0.0, 0
        self.model.train(False)
        for x, y in loader(self.heldout, self.eval_batch_size):
            logits = functional_call(self.model, params, (x.to(self.device),))
            loss = torch.nn.functional.cross_entropy(logits.float(), y.to(self.device), reduction="sum")
            loss.backward()
            total += float(loss.detach())
            n += len(y)
        grads = {
            k: (p.grad / n).cpu() if p.grad is not None else torch.zeros_like(p).cpu()
            for k, p in params.items()
            if p.is_floating_point()
        }
        return total / n, grads

    def evaluate_weights(self, state: StateDict) -> EvalResult:
        """Score arbitrary weights (e.g. a point between two ingredients) on the whole held-out split."""
        self.model.load_state_dict(state)
        result = early_rejection_evaluate(self._batches(self.model), None)
        self.images_evaluated += result.evaluated
        return result

    def evaluate(self, ids: list[str], max_wrong: int | None) -> EvalResult:
        """Score the soup of ``ids`` on the held-out split, stopping once it has more than ``max_wrong`` errors."""
        model = self.classifier(list(ids))
        result = early_rejection_evaluate(self._batches(model), max_wrong)
        self.images_evaluated += result.evaluated
        return result


def weights_file_problem(path: Path, reference: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """Why the safetensors file ``path`` no longer has the keys, shapes and dtypes of ``reference`` or its bytes
    (read from its header, no tensor loaded); None when it still does."""
    try:
        with open(path, "rb") as f:
            entries, _ = read_header(f, str(path))
            size = os.fstat(f.fileno()).st_size
    except (OSError, SoupError) as err:
        return f"{type(err).__name__}: {err}"
    if set(entries) != set(reference):
        return f"{path} holds other tensors than the base ({key_set_difference(list(reference), list(entries))})"
    for k, (shape, dtype) in reference.items():
        e = entries[k]
        if e.shape != shape or e.dtype != dtype:
            return f"{k} in {path} is now {e.dtype} {e.shape}, the base has {dtype} {shape}"
    end = max((e.start + e.nbytes for e in entries.values()), default=0)
    if end > size:
        return f"{path} is truncated ({size} bytes, its header needs {end})"
    return None


def trial_records_from_results(run_dir: Path) -> list[TrialRecord]:
    """Completed trials listed in ``run_dir/results.jsonl``, as soup candidates to be checked."""
    from .results import read_jsonl

    out = []
    for row in read_jsonl(Path(run_dir) / RESULTS_FILE):
        if row.get("kind", "individual") == "individual" and row.get("status") == "completed" and row.get("checkpoint"):
            ckpt = row["checkpoint"]
            ckpt = ckpt if os.path.isabs(ckpt) else str(Path(run_dir) / ckpt)
            out.append(TrialRecord(row["trial_id"], ckpt, row.get("heldout_correct")))
    return out
