"""Every soup recipe on one run: computed from the run folder, scored, written to ``soups/NAME/`` and compared.

``cook(run, specs, greedy)`` computes each requested recipe from the admitted
candidates of a finished run: the id recipes (greedy in any order, uniform,
best) as uniform averages, the weight recipes (WiSE-FT, Model Stock, task
arithmetic, TIES, DARE, the learned soups) through a ``RecipeContext`` backed
by the run's ``Kitchen``. Hyperparameters are chosen on held-out only. Each
result is scored on held-out, test and every shift, exported as an open_clip
``local-dir:`` folder ``soups/NAME/`` (servable with ``soup-ray serve RUN_DIR
--method NAME``) and returned as a summary row for ``results.jsonl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .evaluate import correct_count, predict_logits
from .export import export_soup
from .ingredients import Kitchen
from .results import RECIPE_TWINS
from .run_dir import RunDir, plain_name
from .soup import Candidate, GreedyResult, RecipeContext, WeightRecipe, configure_soup_method, greedy_method

Log = Callable[[str], None]

DEFAULT_RECIPES: tuple[Any, ...] = (
    "greedy",
    {"method": "greedy", "order": "random", "label": "greedy_random_order"},
    "uniform",
    "wise_ft",
    "model_stock",
    "task_arithmetic",
    "ties",
    "dare",
    "learned",
    "learned_by_layer",
)
"""What ``soup.methods: all`` means."""


@dataclass
class RecipeSpec:
    """One entry of ``soup.methods``: a registered recipe, its options and the label of its row and folder."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = plain_name(self.label or self.method, "soup.methods: the label")  # it names soups/LABEL/

    @classmethod
    def parse(cls, entry: str | Mapping[str, Any]) -> RecipeSpec:
        if isinstance(entry, str):
            return cls(entry, {}, entry)
        data = dict(entry)
        method = str(data.pop("method"))
        label = str(data.pop("label", "") or method)
        return cls(method, data, label)


def recipe_specs(entries: Sequence[str | Mapping[str, Any]] | str) -> list[RecipeSpec]:
    """``soup.methods`` as specs (``"all"`` is every recipe); duplicate labels are an error."""
    items = list(DEFAULT_RECIPES) if entries == "all" or entries == ["all"] else list(entries)
    specs = [RecipeSpec.parse(e) for e in items]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"soup.methods: the labels {dup} appear twice; give one a `label:`")
    for s in specs:
        configure_soup_method(s.method, s.options)  # unknown names and options fail here, before any work
    return specs


@dataclass
class Cooked:
    """One computed recipe: its summary row (accuracies, cost, parameters) and its extras (e.g. curves)."""

    label: str
    row: dict[str, Any]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def score_state(
    kitchen: Kitchen, state: Mapping[str, torch.Tensor], skip: Sequence[str] = ()
) -> tuple[dict[str, float], int]:
    """Accuracy of some weights on every eval set of the run (held-out, test, each shift) but those in ``skip``,
    and their held-out correct count (0 when held-out is skipped)."""
    kitchen.model.load_state_dict(dict(state))
    return score_model(kitchen, kitchen.model, skip)


def score_model(kitchen: Kitchen, model: torch.nn.Module, skip: Sequence[str] = ()) -> tuple[dict[str, float], int]:
    """Accuracy of a classifier on every eval set of the run but those in ``skip``, and its held-out correct
    count."""
    accs: dict[str, float] = {}
    heldout_correct = 0
    for name, ds in kitchen.bundle.eval_sets().items():
        if name in skip:
            continue
        logits, labels = predict_logits(model, ds, kitchen.eval_batch_size)
        n = correct_count(logits, labels)
        accs[name] = n / len(labels) if len(labels) else float("nan")
        if name == "heldout":
            heldout_correct = n
    return accs, heldout_correct


def context(kitchen: Kitchen, candidates: Sequence[Candidate], greedy: GreedyResult, log: Log) -> RecipeContext:
    """The weight recipes' view of a run: base, loader, held-out scorer, greedy soup, held-out gradient."""
    return RecipeContext(
        base=kitchen.base_state(),
        load=kitchen.weights,
        score=lambda state: kitchen.evaluate_weights(state).correct,
        heldout_size=kitchen.heldout_size,
        greedy=lambda: greedy,
        loss_and_grad=kitchen.heldout_loss_and_grad,
        log=log,
    )


def _summary_row(
    label: str,
    method: str,
    accs: Mapping[str, float],
    shifts: Sequence[str],
    ingredients: Sequence[str],
    params: Mapping[str, Any],
    heldout_correct: int,
    **extra: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model_name": label,
        "kind": "soup",
        "method": method,
        "status": "summary",
        "summary": True,
        "recipe": True,
        "heldout": accs.get("heldout"),
        "test": accs.get("test"),
    }
    for s in shifts:
        row[s] = accs.get(s)
    vals = [row[s] for s in shifts if row[s] is not None]
    row["shift_mean"] = sum(vals) / len(vals) if vals and len(vals) == len(shifts) else None
    row["forward_passes"] = 1
    row["ingredients"] = list(ingredients)
    row["n_ingredients"] = len(ingredients)
    row["params"] = dict(params)
    row["heldout_correct"] = heldout_correct
    row.update(extra)
    return row


def cook_one(
    kitchen: Kitchen,
    candidates: Sequence[Candidate],
    greedy: GreedyResult,
    spec: RecipeSpec,
    run_dir: Path,
    shifts: Sequence[str],
    log: Log = print,
    scored: Mapping[tuple[str, ...], Mapping[str, float]] | None = None,
) -> Cooked:
    """Compute, score and export one recipe. ``scored`` holds the accuracies of plain averages already scored,
    by their sorted ingredients: a greedy or uniform recipe that averages the same runs reuses them."""
    t0 = time.perf_counter()
    recipe = configure_soup_method(spec.method, spec.options)
    extra: dict[str, Any] = {}
    if isinstance(recipe, WeightRecipe):
        result = recipe.merge(candidates, context(kitchen, candidates, greedy, log))
        weights, ids, correct, params = result.weights, result.ingredients, result.heldout_correct, result.params
        extra.update(result.extra)
        if result.grid:
            extra["grid"] = result.grid
        if spec.method == "wise_ft":
            extra["curve"] = wise_ft_curve(kitchen, result, shifts)
    else:
        chosen = recipe(candidates, kitchen.evaluate, heldout_size=kitchen.heldout_size)
        ids, correct, params = list(chosen.ingredients), chosen.correct, recipe.describe()
        params.pop("method", None)
        weights = kitchen.soup_weights(ids)
    chosen_point = next((p for p in extra.get("curve", ()) if p["alpha"] == params.get("alpha")), None)
    known = (scored or {}).get(tuple(sorted(ids))) if spec.method in RECIPE_TWINS else None
    if chosen_point is not None:  # WiSE-FT's chosen alpha is scored on the curve already
        accs = dict(chosen_point["accs"])
    elif known is not None:
        accs = dict(known)
    else:
        accs, _ = score_state(kitchen, weights)
    row = _summary_row(spec.label, spec.method, accs, shifts, ids, params, correct)
    folder = RunDir(run_dir).recipe(spec.label)
    export_soup(
        RunDir(run_dir).base,
        weights,
        folder,
        {
            "version": 1,
            "method": spec.method,
            "label": spec.label,
            "params": params,
            "ingredients": ids,
            "heldout_accuracy": correct / kitchen.heldout_size,
            "heldout_correct": correct,
            "heldout_size": kitchen.heldout_size,
            "published_at": time.time(),
        },
    )
    seconds = time.perf_counter() - t0
    row["seconds"] = round(seconds, 2)
    log(
        f"recipe {spec.label}: held-out {100 * correct / kitchen.heldout_size:.1f}%, test "
        f"{100 * (accs.get('test') or 0):.1f}% ({len(ids)} model(s), {seconds:.1f}s) -> {folder}"
    )
    return Cooked(spec.label, row, seconds, extra)


def wise_ft_curve(kitchen: Kitchen, result: Any, shifts: Sequence[str]) -> list[dict[str, Any]]:
    """Test and mean-shift accuracy along the WiSE-FT line (the WiSE-FT figure), alpha by alpha of the recipe's
    grid. Held-out is the grid's own score, not scored again; ``accs`` holds every set's accuracy."""
    from .soup import average_state_dicts
    from .soup.merges import wise_ft

    target = average_state_dicts([lambda i=i: kitchen.weights(i) for i in result.ingredients])
    base = kitchen.base_state()
    curve = []
    for point in sorted(result.grid, key=lambda g: g["alpha"]):
        accs, _ = score_state(kitchen, wise_ft(base, target, point["alpha"]), skip=("heldout",))
        accs["heldout"] = point["heldout"]
        vals = [accs[s] for s in shifts if s in accs]
        curve.append(
            {
                "alpha": point["alpha"],
                "heldout": point["heldout"],
                "test": accs.get("test"),
                "shift_mean": sum(vals) / len(vals) if vals else None,
                "accs": accs,
            }
        )
    return curve


def cook(
    kitchen: Kitchen,
    candidates: Sequence[Candidate],
    specs: Sequence[RecipeSpec],
    run_dir: Path,
    shifts: Sequence[str],
    greedy: GreedyResult | None = None,
    log: Log = print,
    scored: Mapping[tuple[str, ...], Mapping[str, float]] | None = None,
) -> list[Cooked]:
    """Every recipe in ``specs`` on one run, in order; a recipe that fails is logged and left out."""
    greedy = greedy or greedy_method(">=")(candidates, kitchen.evaluate, heldout_size=kitchen.heldout_size)
    out = []
    for spec in specs:
        try:
            out.append(cook_one(kitchen, candidates, greedy, spec, run_dir, shifts, log, scored))
        except (ValueError, RuntimeError) as err:  # SoupError is a ValueError: a recipe that cannot apply here
            log(f"recipe {spec.label} failed: {type(err).__name__}: {err}")
    return out


def winner(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The best one-model row on held-out (ties: fewer ingredients, then the earlier row); ensembles compete not."""
    best = None
    for i, r in enumerate(rows):
        if r.get("heldout") is None or int(r.get("forward_passes", 1)) != 1:
            continue
        key = (r["heldout"], -int(r.get("forward_passes", 1)), -int(r.get("n_ingredients", 0) or 0), -i)
        if best is None or key > best[0]:
            best = (key, r["model_name"])
    return best[1] if best else None
