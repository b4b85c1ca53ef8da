"""The run report: soups and ensembles next to the best single model.

For a finished run this module admits every completed trial's checkpoint,
builds the uniform soup, the greedy soup, the ensemble of all models and the
greedy ensemble, scores each on the held-out, test and shift sets, and writes
them out: summary rows in ``results.jsonl``, ``report.md``, the accuracy
scatter of the paper (``figure.png``) and the greedy trajectory
(``greedy.png``).

Ensembles are computed from the logits every trial cached at the end of
training, so they cost no forward pass here; soups are scored by running the
averaged weights through the base classifier.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .atomic import replacing, write_text
from .cookbook import cook, recipe_specs, score_model, winner
from .diagnostics import soup_diagnostics
from .evaluate import correct_count
from .ingredients import CheckpointRejected, Kitchen, trial_records_from_results
from .results import is_recipe_twin, read_jsonl, write_jsonl
from .run_dir import (
    CHECKPOINT_LOGITS,
    FIGURE_PNG,
    GREEDY_PNG,
    INTERPOLATION_PNG,
    REPORT_MD,
    RESULTS_FILE,
    SOUPS_DIR,
    WISE_FT_PNG,
    RunDir,
)
from .soup import (
    Candidate,
    GreedyResult,
    SoupError,
    SoupMethod,
    Tie,
    configure_soup_method,
    greedy_ensemble,
    greedy_method,
    sort_candidates,
)

Log = Callable[[str], None]

SUMMARY_NAMES: tuple[str, ...] = (
    "best_individual",
    "uniform_soup",
    "greedy_soup",
    "ensemble",
    "greedy_ensemble",
)
"""Model names of the summary rows, in table order."""

_LABELS = {
    "best_individual": "best individual model",
    "uniform_soup": "uniform soup",
    "greedy_soup": "greedy soup",
    "ensemble": "ensemble (all models)",
    "greedy_ensemble": "greedy ensemble",
}


class ReportError(ValueError):
    """The run cannot be reported on (no usable checkpoints, inconsistent logits, ...)."""


# ---------------------------------------------------------------------------
# Admission
# ---------------------------------------------------------------------------


@dataclass
class AdmittedRun:
    """A run's kitchen, the admitted candidates (sort order) and the rejected trials."""

    run_dir: Path
    kitchen: Kitchen
    candidates: list[Candidate]
    rejected: list[dict[str, str]]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial_id -> results.jsonl row

    @property
    def ids(self) -> list[str]:
        """Admitted trial ids, best held-out first."""
        return [c.id for c in self.candidates]


def results_path(run_dir: Path) -> Path:
    """``run_dir/results.jsonl``; raises ``FileNotFoundError`` naming it when absent."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a finished run folder (run `soup-ray sweep CONFIG` first)"
        )
    return path


def admit_run(run_dir: Path, log: Log = print, kitchen: Kitchen | None = None) -> AdmittedRun:
    """Admit every completed trial of ``run_dir``; rejected checkpoints are kept with their reason."""
    run_dir = Path(run_dir)
    path = results_path(run_dir)
    rows = {
        str(r["trial_id"]): r
        for r in read_jsonl(path)
        if r.get("trial_id") is not None and r.get("kind", "individual") == "individual"
    }
    records = trial_records_from_results(run_dir)
    kitchen = kitchen or Kitchen(run_dir)
    candidates: list[Candidate] = []
    rejected: list[dict[str, str]] = []
    for record in records:
        try:
            cand = kitchen.admit(record)
        except CheckpointRejected as err:
            rejected.append({"trial_id": record.trial_id, "reason": str(err)})
            log(f"rejected {record.trial_id}: {err}")
            continue
        if not 0 <= cand.heldout_correct <= kitchen.heldout_size:
            reason = f"held-out correct count {cand.heldout_correct} outside [0, {kitchen.heldout_size}]"
            rejected.append({"trial_id": record.trial_id, "reason": reason})
            log(f"rejected {record.trial_id}: {reason}")
            continue
        candidates.append(cand)
    if not candidates:
        raise ReportError(
            f"no admissible checkpoint in {run_dir} ({len(records)} completed trial(s), {len(rejected)} rejected)"
        )
    return AdmittedRun(run_dir, kitchen, sort_candidates(candidates), rejected, rows)


# ---------------------------------------------------------------------------
# Soup methods offline
# ---------------------------------------------------------------------------


def method_ingredients(
    run_dir: Path,
    method: str | SoupMethod,
    tie: Tie | None = None,
    early_rejection: bool = True,
    *,
    admitted: AdmittedRun | None = None,
    log: Log = print,
) -> GreedyResult:
    """Recompute a soup recipe (a registered name or a configured method object) from the run's checkpoints.

    ``tie`` configures the recipes that declare a tie rule (``greedy``); the
    others ignore it.
    """
    fn = method if isinstance(method, SoupMethod) else configure_soup_method(method, tie=tie)
    run = admitted or admit_run(Path(run_dir), log)
    k = run.kitchen
    return fn(run.candidates, k.evaluate, heldout_size=k.heldout_size, early_rejection=early_rejection)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def _row(
    name: str,
    kind: str,
    accs: Mapping[str, float],
    shifts: Sequence[str],
    ingredients: Sequence[str],
    forward_passes: int,
    **extra: Any,
) -> dict[str, Any]:
    """A summary row in the shape of the individual rows of ``results.jsonl``."""
    row: dict[str, Any] = {
        "model_name": name,
        "kind": kind,
        "status": "summary",
        "summary": True,
        "heldout": accs.get("heldout"),
        "test": accs.get("test"),
    }
    for s in shifts:
        row[s] = accs.get(s)
    vals = [row[s] for s in shifts if row[s] is not None]
    row["shift_mean"] = sum(vals) / len(vals) if vals and len(vals) == len(shifts) else None
    row["forward_passes"] = int(forward_passes)
    row["ingredients"] = list(ingredients)
    row["n_ingredients"] = len(ingredients)
    row.update(extra)
    return row


def score_weights(kitchen: Kitchen, ids: Sequence[str]) -> tuple[dict[str, float], int]:
    """Accuracy of the uniform weight average of ``ids`` on every eval set, and its held-out correct count."""
    return score_model(kitchen, kitchen.classifier(list(ids)))


def _read_logits(path: Path, names: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{eval set: (logits, labels)}`` from one checkpoint's cached logits file."""
    out = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name in names:
            if name not in keys or f"{name}.labels" not in keys:
                raise ReportError(f"{path} has no cached logits for {name!r}")
            out[name] = (f.get_tensor(name).float(), f.get_tensor(f"{name}.labels").long())
    return out


class LogitStore:
    """Cached logits of the admitted checkpoints, read one file at a time.

    Each eval set keeps its own sum and shape, so shifts with their own label space
    (fewer columns, see :mod:`soup_ray.label_space`) average like any other set. Those
    logits were projected by each trial: for a mapped shift (ObjectNet, a max over
    ImageNet columns) the ensemble is the mean of per-model projected logits, not the
    projection of the mean (max is not linear); that is accepted.
    """

    def __init__(self, run: AdmittedRun, names: Sequence[str], log: Log):
        self.run = run
        self.names = list(names)
        self.labels: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.excluded: list[dict[str, str]] = []
        self.usable: list[str] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.heldout: dict[str, torch.Tensor] = {}
        for tid in run.ids:
            try:
                logits = self.load(tid)
            except (ReportError, SafetensorError, OSError, RuntimeError) as err:
                self.excluded.append({"trial_id": tid, "reason": str(err)})
                log(f"no ensemble for {tid}: {err}")
                continue
            self.usable.append(tid)
            self.heldout[tid] = logits["heldout"][0]
            for name, (lg, _) in logits.items():
                if name in self.sums:
                    self.sums[name].add_(lg)
                else:
                    self.sums[name] = lg.clone()

    def path(self, tid: str) -> Path:
        return Path(self.run.kitchen.paths[tid].checkpoint) / CHECKPOINT_LOGITS

    def load(self, tid: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One checkpoint's logits, checked against the labels and shapes seen first."""
        logits = _read_logits(self.path(tid), self.names)
        for name, (lg, lb) in logits.items():
            if lg.dim() != 2 or lb.dim() != 1 or lg.shape[0] != lb.shape[0]:
                raise ReportError(f"{self.path(tid)}: malformed logits for {name!r}")
            if name not in self.labels:
                self.labels[name], self.shapes[name] = lb, lg.shape
            elif lg.shape != self.shapes[name] or not torch.equal(lb, self.labels[name]):
                raise ReportError(f"{self.path(tid)}: logits for {name!r} do not match the other checkpoints")
        return logits

    def mean_accuracies(self, ids: Sequence[str]) -> dict[str, float]:
        """Accuracy of the mean logits of ``ids`` on every eval set."""
        if list(ids) == self.usable:
            sums = self.sums
        else:
            sums = {}
            for tid in ids:
                for name, (lg, _) in self.load(tid).items():
                    if name in sums:
                        sums[name].add_(lg)
                    else:
                        sums[name] = lg.clone()
        return {
            name: correct_count(sums[name] / len(ids), self.labels[name]) / len(self.labels[name])
            for name in self.names
        }


def _history_from_steps(steps: Sequence[Any], run: AdmittedRun) -> list[dict[str, Any]]:
    """Plot points from greedy decisions: candidate, its accuracy, the decision, the soup after it."""
    h = run.kitchen.heldout_size
    own = {c.id: c.heldout_correct for c in run.candidates}
    soup_size = 0
    points = []
    for s in steps:
        soup_size += int(s.accepted)
        points.append(
            {
                "position": s.position,
                "candidate_id": s.candidate_id,
                "candidate_accuracy": own[s.candidate_id] / h if s.candidate_id in own else None,
                "trial_soup_accuracy": None if s.correct is None else s.correct / h,
                "accepted": bool(s.accepted),
                "soup_accuracy": s.soup_correct / h,
                "n_ingredients": soup_size,
            }
        )
    return points


def _history_for_ingredients(ingredients: Sequence[str], run: AdmittedRun) -> list[dict[str, Any]]:
    """Plot points for a soup chosen elsewhere: each prefix of its ingredients is scored on held-out."""
    k, h = run.kitchen, run.kitchen.heldout_size
    chosen = set(ingredients)
    soup: list[str] = []
    soup_acc: float | None = None
    points = []
    for position, cand in enumerate(run.candidates):
        accepted = cand.id in chosen
        trial_acc = None
        if accepted:
            soup.append(cand.id)
            if len(soup) == 1:
                correct = cand.heldout_correct
            else:
                correct = k.evaluate(list(soup), None).correct
            soup_acc = trial_acc = correct / h
        points.append(
            {
                "position": position,
                "candidate_id": cand.id,
                "candidate_accuracy": cand.heldout_correct / h,
                "trial_soup_accuracy": trial_acc,
                "accepted": accepted,
                "soup_accuracy": soup_acc,
                "n_ingredients": len(soup),
            }
        )
    return points


def compute_report(
    run_dir: Path,
    *,
    greedy_ingredients: list[str] | None = None,
    tie: Tie = ">=",
    early_rejection: bool = True,
    log: Log = print,
    admitted: AdmittedRun | None = None,
    greedy_result: GreedyResult | None = None,
    recipes: Sequence[Any] = (),
) -> dict[str, Any]:
    """Score the best model, the uniform and greedy soups and both ensembles of a finished run.

    ``greedy_ingredients`` (e.g. from the live soup) skips the greedy search;
    ``greedy_result`` (e.g. from :func:`method_ingredients`) also supplies its
    decisions.  Returns a JSON-serialisable dict with ``rows`` (one per
    summary method), ``history`` (the greedy trajectory), ``individuals``,
    ``rejected`` and counts.
    """
    if tie not in (">=", ">"):
        raise SoupError(f"tie must be '>=' or '>', got {tie!r}")
    run_dir = Path(run_dir)
    run = admitted or admit_run(run_dir, log)
    k = run.kitchen
    h = k.heldout_size
    shifts = list(k.bundle.shifts)
    eval_names = list(k.bundle.eval_sets())
    ids = run.ids
    log(f"{len(ids)} candidates admitted, {len(run.rejected)} rejected")
    rows: dict[str, dict[str, Any]] = {}

    # Best individual: the first in sort order; accuracies as recorded by its trial.
    best = run.candidates[0]
    src = run.rows.get(best.id, {})
    accs = {n: src.get(n) for n in ["heldout", "test", *shifts]}
    if accs["heldout"] is None:
        accs["heldout"] = best.heldout_correct / h
    rows["best_individual"] = _row(
        "best_individual", "individual", accs, shifts, [best.id], 1, heldout_correct=best.heldout_correct
    )

    # Uniform soup.
    log(f"scoring the uniform soup of {len(ids)} models")
    uni_accs, uni_correct = score_weights(k, ids)
    rows["uniform_soup"] = _row("uniform_soup", "soup", uni_accs, shifts, ids, 1, heldout_correct=uni_correct)

    # Greedy soup.
    if greedy_result is not None:
        chosen = list(greedy_result.ingredients)
        history = (
            _history_from_steps(greedy_result.history, run)
            if greedy_result.history
            else _history_for_ingredients(chosen, run)
        )
        source = "given"
    elif greedy_ingredients is not None:
        chosen = list(greedy_ingredients)
        unknown = [i for i in chosen if i not in set(ids)]
        if not chosen or unknown:
            raise ReportError(f"greedy ingredients {unknown or chosen} are not admitted candidates of {run_dir}")
        history = _history_for_ingredients(chosen, run)
        source = "given"
    else:
        log(f"computing the greedy soup (tie {tie!r}, early rejection {'on' if early_rejection else 'off'})")
        greedy_result = greedy_method(tie)(run.candidates, k.evaluate, heldout_size=h, early_rejection=early_rejection)
        chosen = list(greedy_result.ingredients)
        history = _history_from_steps(greedy_result.history, run)
        source = "computed"
    log(f"scoring the greedy soup of {len(chosen)} models")
    if chosen == ids:
        g_accs, g_correct = uni_accs, uni_correct
    else:
        g_accs, g_correct = score_weights(k, chosen)
    extra: dict[str, Any] = {"heldout_correct": g_correct, "tie": tie, "source": source}
    if greedy_result is not None:
        extra.update(evaluations=greedy_result.evaluations, images_evaluated=greedy_result.images_evaluated)
    rows["greedy_soup"] = _row("greedy_soup", "soup", g_accs, shifts, chosen, 1, **extra)

    # Why the greedy soup kept what it kept.
    log("measuring interpolation barriers and distances from the base")
    uniform_drop = 100 * (best.heldout_correct - uni_correct) / h
    diagnostics = soup_diagnostics(k, run.candidates, run.rows, chosen, uniform_drop_points=uniform_drop)

    # Every other recipe asked for, from the same candidates.
    specs = recipe_specs(recipes) if recipes else []
    scored = {tuple(sorted(ids)): uni_accs, tuple(sorted(chosen)): g_accs}  # the twins' scores, not computed again
    cooked = cook(
        k, run.candidates, specs, run_dir, shifts, greedy=GreedyResult(chosen, g_correct), scored=scored, log=log
    )

    # Ensembles from cached logits.
    store = LogitStore(run, eval_names, log)
    if store.usable:
        ens_accs = store.mean_accuracies(store.usable)
        rows["ensemble"] = _row("ensemble", "ensemble", ens_accs, shifts, store.usable, len(store.usable))
        ge = greedy_ensemble(store.usable, store.heldout, store.labels["heldout"], tie)
        ge_accs = store.mean_accuracies(ge.ingredients)
        rows["greedy_ensemble"] = _row(
            "greedy_ensemble",
            "ensemble",
            ge_accs,
            shifts,
            ge.ingredients,
            len(ge.ingredients),
            heldout_correct=ge.correct,
            tie=tie,
        )

    individuals = []
    for c in run.candidates:
        r = run.rows.get(c.id, {})
        individuals.append(
            {
                "trial_id": c.id,
                "heldout": r.get("heldout", c.heldout_correct / h),
                "test": r.get("test"),
                "shift_mean": r.get("shift_mean"),
                **{s: r.get(s) for s in shifts},
            }
        )
    return {
        "run_dir": str(run_dir),
        "shifts": shifts,
        "heldout_size": h,
        "tie": tie,
        "early_rejection": early_rejection,
        "candidates": ids,
        "rejected": list(run.rejected),
        "live_rejected": live_soup_rejections(run_dir),
        "ensemble_excluded": store.excluded,
        "rows": [rows[n] for n in SUMMARY_NAMES if n in rows],
        "individuals": individuals,
        "history": history,
        "diagnostics": diagnostics.to_json(),
        "recipes": [c.row for c in cooked],
        "recipe_extras": {c.label: c.extra for c in cooked},
        "winner": winner([rows[n] for n in SUMMARY_NAMES if n in rows] + [c.row for c in cooked]),
    }


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * float(v):.1f}"


def _table_cells(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    shifts = list(report["shifts"])
    header = ["method", "held-out", "test", *shifts, "shift mean", "forward passes", "models"]
    body = []
    rows = [*report["rows"], *report.get("recipes", [])]
    for r in rows:
        if is_recipe_twin(r, report["rows"]):
            continue  # one soup, one row: the greedy and uniform recipes are the greedy and uniform soups
        body.append(
            [
                r["model_name"],
                _pct(r.get("heldout")),
                _pct(r.get("test")),
                *[_pct(r.get(s)) for s in shifts],
                _pct(r.get("shift_mean")),
                str(r.get("forward_passes", "")),
                str(len(r.get("ingredients") or [])),
            ]
        )
    return header, body


def soup_table(report: Mapping[str, Any]) -> str:
    """A fixed-width console table of the summary rows (accuracies in percent)."""
    header, body = _table_cells(report)
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) if body else len(header[i]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(header, widths, strict=True))),
        "  ".join("-" * w for w in widths),
    ]
    for b in body:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths, strict=True)))
        )
    return "\n".join(lines)


def counts_line(report: Mapping[str, Any]) -> str:
    """One sentence: candidates, rejected checkpoints (with reasons) and the greedy soup's size."""
    greedy = next((r for r in report["rows"] if r["model_name"] == "greedy_soup"), None)
    rejected = report.get("rejected") or []
    text = f"{len(report['candidates'])} candidates, {len(rejected)} rejected"
    if rejected:
        text += " (" + "; ".join(f"{r['trial_id']}: {r['reason']}" for r in rejected) + ")"
    if greedy is not None:
        text += f", greedy soup of {len(greedy['ingredients'])} model(s)"
    return text + "."


def live_soup_rejections(run_dir: Path) -> list[dict[str, str]]:
    """The offers the live soup actor set aside during the sweep (its dead letters), with their reasons."""
    state_file = RunDir(run_dir).state_file
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return []
    return [{"trial_id": str(k), "reason": str(v)} for k, v in sorted((state.get("rejected") or {}).items())]


def dead_letters_markdown(report: Mapping[str, Any]) -> list[str]:
    """A note on every offer the live soup refused, so none goes unnoticed."""
    letters = report.get("live_rejected") or []
    if not letters:
        return []
    lines = [
        "",
        "## Offers the live soup set aside",
        "",
        f"The soup actor refused {len(letters)} offer(s) during the sweep; the soup never included them. "
        "Fix the cause and re-offer with `soup-ray soup RUN_DIR`, or leave them out.",
        "",
        "| offer | reason |",
        "|---|---|",
    ]
    for r in letters:
        lines.append(f"| `{r['trial_id']}` | {r['reason'].replace('|', '/')} |")
    return lines


def markdown_report(report: Mapping[str, Any]) -> str:
    """``report.md``: the summary table and the counts line."""
    header, body = _table_cells(report)
    lines = [
        "# Model soup report",
        "",
        "Accuracy in percent; forward passes per image at inference.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for b in body:
        lines.append("| " + " | ".join(b) + " |")
    lines += ["", counts_line(report)]
    lines += dead_letters_markdown(report)
    if report.get("winner"):
        lines += ["", f"Best one-model soup on held-out (chosen without looking at test): **{report['winner']}**."]
    lines += recipes_markdown(report)
    greedy = next((r for r in report["rows"] if r["model_name"] == "greedy_soup"), None)
    if greedy is not None:
        lines += ["", "Greedy soup ingredients (in order): " + ", ".join(f"`{i}`" for i in greedy["ingredients"])]
    excluded = report.get("ensemble_excluded") or []
    if excluded:
        lines += [
            "",
            "Left out of the ensembles (no usable cached logits): "
            + "; ".join(f"{e['trial_id']}: {e['reason']}" for e in excluded),
        ]
    lines += diagnostics_markdown(report.get("diagnostics"))
    return "\n".join(lines) + "\n"


def recipes_markdown(report: Mapping[str, Any]) -> list[str]:
    """The parameters each recipe chose on held-out, and where it was written."""
    recipes = report.get("recipes") or []
    if not recipes:
        return []
    lines = [
        "",
        "## Recipes",
        "",
        "Each recipe's hyperparameters were chosen on the held-out split only; each is "
        "an open_clip `local-dir:` folder under `soups/` (serve one with `soup-ray serve RUN_DIR --method NAME`).",
        "",
        "| recipe | method | chosen parameters | models | seconds |",
        "|---|---|---|---:|---:|",
    ]
    for r in recipes:
        params = ", ".join(
            f"{k}={v}" for k, v in (r.get("params") or {}).items() if not isinstance(v, (list, tuple, dict))
        )
        lines.append(
            f"| `{r['model_name']}` | {r['method']} | {params or '-'} | {r['n_ingredients']} | "
            f"{r.get('seconds', '-')} |"
        )
    return lines


def diagnostics_markdown(diag: Mapping[str, Any] | None) -> list[str]:
    """The "why" section of ``report.md``: the verdict, the barriers and each run's distance from the base."""
    if not diag:
        return []
    lines = [
        "",
        "## Why the greedy soup kept what it kept",
        "",
        f"**Verdict:** {diag['verdict']}",
        "",
        f"Held-out accuracy (%) on the straight line from the best run `{diag['curves'][0]['best']}` to each "
        "partner (alpha 0 = the best run, 1 = the partner); the barrier is the drop at the midpoint below the "
        "mean of the ends (`interpolation.png`)."
        if diag.get("curves")
        else "Only one candidate: no barrier to measure.",
        "",
    ]
    if diag.get("curves"):
        alphas = diag["curves"][0]["alphas"]
        lines += [
            "| partner | in soup | " + " | ".join(f"a={a:g}" for a in alphas) + " | barrier (points) |",
            "|---|---|" + "---:|" * len(alphas) + "---:|",
        ]
        for c in diag["curves"]:
            lines.append(
                f"| `{c['partner']}` | {'yes' if c['partner_in_soup'] else 'no'} | "
                + " | ".join(f"{100 * v:.1f}" for v in c["heldout"])
                + f" | {c['barrier_points']:.1f} |"
            )
    lines += [
        "",
        "Distance of each run from the shared base (relative L2 of the weight change), best held-out first:",
        "",
        "| run | lr | held-out | distance | in soup |",
        "|---|---:|---:|---:|---|",
    ]
    for r in diag["distances"]:
        lr = "-" if r.get("lr") is None else f"{r['lr']:.2g}"
        lines.append(
            f"| `{r['trial_id']}` | {lr} | {100 * r['heldout']:.1f} | {r['distance']:.4f} | "
            f"{'yes' if r['in_soup'] else ''} |"
        )
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_MARKERS = {
    "best_individual": ("D", "tab:blue"),
    "uniform_soup": ("s", "tab:orange"),
    "greedy_soup": ("*", "tab:red"),
    "ensemble": ("^", "tab:green"),
    "greedy_ensemble": ("v", "tab:purple"),
}


def plot_scatter(report: Mapping[str, Any], path: Path) -> Path:
    """The paper's figure: test accuracy (x) against mean shift accuracy (y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    pts = [
        (r["test"], r["shift_mean"])
        for r in report["individuals"]
        if r.get("test") is not None and r.get("shift_mean") is not None
    ]
    if pts:
        ax.scatter(
            [100 * x for x, _ in pts],
            [100 * y for _, y in pts],
            s=14,
            c="0.55",
            alpha=0.8,
            label="fine-tuned models",
            zorder=2,
        )
    for r in report.get("recipes", []):
        if r.get("test") is None or r.get("shift_mean") is None or is_recipe_twin(r, report["rows"]):
            continue  # the greedy and uniform recipes sit on the greedy and uniform soups' markers
        ax.scatter(
            [100 * r["test"]],
            [100 * r["shift_mean"]],
            marker="P",
            s=60,
            c="tab:cyan",
            edgecolors="k",
            linewidths=0.5,
            zorder=3,
        )
        ax.annotate(
            r["model_name"],
            (100 * r["test"], 100 * r["shift_mean"]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
        )
    for r in report["rows"]:
        if r.get("test") is None or r.get("shift_mean") is None:
            continue
        marker, color = _MARKERS.get(r["model_name"], ("o", "k"))
        size = 220 if marker == "*" else 80
        ax.scatter(
            [100 * r["test"]],
            [100 * r["shift_mean"]],
            marker=marker,
            s=size,
            c=color,
            edgecolors="k",
            linewidths=0.6,
            label=_LABELS.get(r["model_name"], r["model_name"]),
            zorder=3,
        )
    return _finish(
        plt,
        fig,
        ax,
        path,
        "test accuracy (%)",
        f"mean accuracy over {len(report['shifts'])} shifts (%)",
        "Soups and ensembles vs. individual fine-tuned models",
    )


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend a one-axis figure, write it to ``path`` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_greedy(report: Mapping[str, Any], path: Path) -> Path:
    """Held-out accuracy as candidates are considered in order, accepted ones marked."""
    plt = _plt()
    hist = list(report["history"])
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xs = [p["position"] + 1 for p in hist]
    own = [100 * p["candidate_accuracy"] if p["candidate_accuracy"] is not None else float("nan") for p in hist]
    soup = [100 * p["soup_accuracy"] if p["soup_accuracy"] is not None else float("nan") for p in hist]
    ax.plot(xs, own, "o", ms=4, c="0.55", label="candidate alone")
    ax.step(xs, soup, where="post", c="tab:red", lw=1.5, label="greedy soup")
    acc = [(x, y) for x, y, p in zip(xs, soup, hist, strict=True) if p["accepted"]]
    if acc:
        ax.scatter(
            [x for x, _ in acc],
            [y for _, y in acc],
            marker="*",
            s=120,
            c="tab:red",
            edgecolors="k",
            linewidths=0.5,
            zorder=3,
            label="accepted",
        )
    rej = [
        (x, 100 * p["trial_soup_accuracy"])
        for x, p in zip(xs, hist, strict=True)
        if not p["accepted"] and p.get("trial_soup_accuracy") is not None
    ]
    if rej:
        ax.scatter(
            [x for x, _ in rej],
            [y for _, y in rej],
            marker="x",
            s=30,
            c="tab:blue",
            zorder=3,
            label="rejected (soup with it)",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # candidates are counted: 1, 2, 3, never 1.5
    return _finish(
        plt,
        fig,
        ax,
        path,
        "candidate (sorted by held-out accuracy)",
        "held-out accuracy (%)",
        "Greedy soup: held-out accuracy as candidates are considered",
    )


def _is_summary(row: Mapping[str, Any]) -> bool:
    """Whether a results.jsonl row is a report row (trial rows are named ``trial_<id>``)."""
    return bool(row.get("summary")) or row.get("model_name") in SUMMARY_NAMES


def write_report(run_dir: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write summary rows into ``results.jsonl`` (replacing old ones), ``report.md`` and both figures."""
    run_dir = Path(run_dir)
    path = results_path(run_dir)
    kept = [r for r in read_jsonl(path) if not _is_summary(r)]
    write_jsonl(path, kept + [dict(r) for r in report["rows"]] + [dict(r) for r in report.get("recipes", [])])
    md = run_dir / REPORT_MD
    write_text(md, markdown_report(report))
    return {
        "results": path,
        "report": md,
        "figure": plot_scatter(report, run_dir / FIGURE_PNG),
        "greedy": plot_greedy(report, run_dir / GREEDY_PNG),
        **(
            {"interpolation": plot_interpolation(report, run_dir / INTERPOLATION_PNG)}
            if (report.get("diagnostics") or {}).get("curves")
            else {}
        ),
        **(
            {"wise_ft": plot_wise_ft(report, run_dir / WISE_FT_PNG)}
            if any("curve" in e for e in (report.get("recipe_extras") or {}).values())
            else {}
        ),
    }


def plot_wise_ft(report: Mapping[str, Any], path: Path) -> Path:
    """The WiSE-FT figure: test (x) against mean shift accuracy (y) as alpha goes from the base to the soup."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for label, extra in (report.get("recipe_extras") or {}).items():
        curve = [p for p in extra.get("curve", []) if p.get("test") is not None and p.get("shift_mean") is not None]
        if not curve:
            continue
        xs, ys = [100 * p["test"] for p in curve], [100 * p["shift_mean"] for p in curve]
        ax.plot(xs, ys, "-o", ms=4, label=f"{label}: alpha 0 (base) to 1")
        for p, x, y in zip(curve, xs, ys, strict=True):
            ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        chosen = next((r for r in report.get("recipes", []) if r["model_name"] == label), None)
        if chosen is not None and chosen.get("test") is not None:
            ax.scatter(
                [100 * chosen["test"]],
                [100 * chosen["shift_mean"]],
                marker="*",
                s=200,
                c="tab:red",
                edgecolors="k",
                zorder=3,
                label=f"chosen on held-out (alpha {chosen['params'].get('alpha')})",
            )
    return _finish(
        plt,
        fig,
        ax,
        path,
        "test accuracy (%)",
        "mean shift accuracy (%)",
        "WiSE-FT: interpolating the base and the fine-tuned weights",
    )


def plot_interpolation(report: Mapping[str, Any], path: Path) -> Path:
    """Held-out accuracy along the line from the best run to each partner: a dip in the middle is a barrier."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for c in report["diagnostics"]["curves"]:
        style = "-" if c["partner_in_soup"] else "--"
        ax.plot(
            c["alphas"],
            [100 * v for v in c["heldout"]],
            style,
            marker="o",
            ms=4,
            label=f"{c['partner']} ({'in soup' if c['partner_in_soup'] else 'rejected'}; "
            f"barrier {c['barrier_points']:.1f})",
        )
    return _finish(
        plt,
        fig,
        ax,
        path,
        "alpha (0 = best run, 1 = partner)",
        "held-out accuracy (%)",
        "Interpolating the best run with the next candidates",
    )


def write_soup_json(
    run_dir: Path, method: str, result: GreedyResult, *, tie: Tie | None, early_rejection: bool, admitted: AdmittedRun
) -> Path:
    """``run_dir/soups/<method>.json``: ingredients, held-out accuracy and search cost."""
    h = admitted.kitchen.heldout_size
    out = Path(run_dir) / SOUPS_DIR / f"{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "method": method,
        "tie": tie,
        "early_rejection": early_rejection,
        "ingredients": list(result.ingredients),
        "heldout_correct": result.correct,
        "heldout_size": h,
        "heldout_accuracy": result.correct / h,
        "evaluations": result.evaluations,
        "images_evaluated": result.images_evaluated,
        "candidates": admitted.ids,
        "rejected": admitted.rejected,
        "history": [asdict(s) for s in result.history],
    }
    write_text(out, json.dumps(data, indent=2) + "\n")
    return out
