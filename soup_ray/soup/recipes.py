"""Weight recipes in the registry: WiSE-FT, Model Stock, task arithmetic, TIES, DARE and the learned soups.

Unlike the greedy, uniform and best soups (uniform averages of chosen ids),
these produce weights of their own. Each is a :class:`WeightRecipe` with
declared parameters; ``merge(candidates, ctx)`` gets a :class:`RecipeContext`
of callables (the shared base, an ingredient loader, a held-out scorer, the
greedy soup's ingredients, a held-out loss-and-gradient for the learned soups)
and returns a :class:`RecipeResult`. Every hyperparameter is chosen on the
held-out split only: a grid is scored with ``ctx.score`` and the best point
wins (ties go to the earlier point of the grid, which is listed simplest
first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .average import average_state_dicts
from .base import Candidate, GreedyResult, SoupError, sort_candidates
from .learned import fit_learned_soup
from .merges import dare_merge, model_stock, task_arithmetic, ties_merge, wise_ft
from .methods import Param, SoupMethod, register_soup_method

StateDict = Mapping[str, Tensor]


@dataclass
class RecipeContext:
    """What a weight recipe may use: all callables, so the recipes stay free of I/O and models."""

    base: StateDict
    load: Callable[[str], StateDict]
    score: Callable[[StateDict], int]
    heldout_size: int
    greedy: Callable[[], GreedyResult]
    loss_and_grad: Callable[[StateDict], tuple[float, Mapping[str, Tensor]]] | None = None
    log: Callable[[str], None] = lambda msg: None


@dataclass
class RecipeResult:
    """A recipe's weights, what went into them, their held-out count and the parameters chosen on held-out."""

    weights: dict[str, Tensor]
    ingredients: list[str]
    heldout_correct: int
    params: dict[str, Any]
    grid: list[dict[str, Any]] = field(default_factory=list)
    """Every grid point tried: its parameters and held-out accuracy."""
    extra: dict[str, Any] = field(default_factory=dict)


class WeightRecipe(SoupMethod):
    """A recipe whose result is new weights; held-out scoring and the base come from a :class:`RecipeContext`."""

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        raise NotImplementedError

    def __call__(
        self, candidates: Iterable[Candidate], evaluate: Any, *, heldout_size: int, early_rejection: bool = True
    ) -> GreedyResult:
        raise SoupError(
            f"soup method {self.name!r} makes new weights: compute it with `soup-ray soup RUN_DIR "
            f"--method {self.name}` (it needs the run's base and held-out split)"
        )

    def _pool(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> list[str]:
        """The ids a recipe merges: every admitted candidate, or the greedy soup's ingredients."""
        ordered = [c.id for c in sort_candidates(candidates)]
        if not ordered:
            raise SoupError(f"soup method {self.name!r} needs at least one candidate")
        if self.options.get("candidates") == "greedy":
            return list(ctx.greedy().ingredients)
        return ordered

    def _loaders(self, ids: Sequence[str], ctx: RecipeContext) -> list[Callable[[], StateDict]]:
        return [lambda i=i: ctx.load(i) for i in ids]

    def _choose(
        self, ctx: RecipeContext, points: Sequence[dict[str, Any]], build: Callable[..., dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], int, dict[str, Any], list[dict]]:
        """Score every grid point on held-out; the best (earliest on ties) wins."""
        best: tuple[int, dict[str, Tensor], dict[str, Any]] | None = None
        tried = []
        for params in points:
            weights = build(**params)
            correct = ctx.score(weights)
            tried.append({**params, "heldout": correct / ctx.heldout_size})
            ctx.log(f"  {self.name} {params}: held-out {100 * correct / ctx.heldout_size:.1f}%")
            if best is None or correct > best[0]:
                best = (correct, weights, params)
            del weights
        assert best is not None
        return best[1], best[0], dict(best[2]), tried


_CANDIDATES = Param(
    "candidates",
    "all",
    "which runs to merge: every admitted candidate, or the greedy soup's ingredients",
    choices=("all", "greedy"),
)


@register_soup_method
class WiseFT(WeightRecipe):
    """WiSE-FT: ``(1 - alpha) * base + alpha * target``, alpha chosen on held-out."""

    name = "wise_ft"
    doc = "interpolate the zero-shot (or LP) base and the greedy soup or the best model; alpha on held-out"
    params = (
        Param("target", "greedy", "what to interpolate towards", choices=("greedy", "best")),
        Param("alphas", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), "the grid of alpha"),
    )

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        ordered = sort_candidates(candidates)
        ids = list(ctx.greedy().ingredients) if self.options["target"] == "greedy" else [ordered[0].id]
        target = average_state_dicts(self._loaders(ids, ctx))
        points = [{"alpha": float(a)} for a in sorted(self.options["alphas"], reverse=True)]  # 1.0 (the target) first
        weights, correct, params, grid = self._choose(ctx, points, lambda alpha: wise_ft(ctx.base, target, alpha))
        return RecipeResult(
            weights, ids, correct, {"target": self.options["target"], **params}, sorted(grid, key=lambda g: g["alpha"])
        )


@register_soup_method
class ModelStock(WeightRecipe):
    """Model Stock: per layer, a ratio from the angle between the task vectors pulls their mean towards the base."""

    name = "model_stock"
    doc = "per tensor t = N cos / (1 + (N - 1) cos) between the candidates' mean and the base (Jang et al. 2024)"
    params = (_CANDIDATES,)

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        ids = self._pool(candidates, ctx)
        weights, ratios = model_stock(ctx.base, self._loaders(ids, ctx))
        correct = ctx.score(weights)
        mean_t = sum(ratios.values()) / len(ratios) if ratios else None
        return RecipeResult(
            weights,
            ids,
            correct,
            {"candidates": self.options["candidates"]},
            extra={
                "ratio_mean": mean_t,
                "ratio_min": min(ratios.values(), default=None),
                "ratio_max": max(ratios.values(), default=None),
            },
        )


@register_soup_method
class TaskArithmetic(WeightRecipe):
    """Task arithmetic: ``base + lambda * sum of task vectors``, lambda = scale / N chosen on held-out."""

    name = "task_arithmetic"
    doc = "the base plus the summed task vectors times scale / N (scale 1 is the uniform soup); scale on held-out"
    params = (_CANDIDATES, Param("scales", (1.0, 0.5, 0.75, 1.25, 1.5, 2.0), "the grid of scale (times 1/N)"))

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        ids = self._pool(candidates, ctx)
        n = len(ids)
        loaders = self._loaders(ids, ctx)
        points = [{"scale": float(s)} for s in self.options["scales"]]
        weights, correct, params, grid = self._choose(
            ctx, points, lambda scale: task_arithmetic(ctx.base, loaders, scale / n)
        )
        return RecipeResult(
            weights,
            ids,
            correct,
            {"candidates": self.options["candidates"], **params, "lambda": params["scale"] / n},
            grid,
        )


@register_soup_method
class Ties(WeightRecipe):
    """TIES merging: trim each task vector, elect a sign per weight, average the agreeing values."""

    name = "ties"
    doc = "TIES (Yadav et al. 2023): trim to a density, elect signs, disjoint mean; density and scale on held-out"
    params = (
        _CANDIDATES,
        Param("densities", (0.2, 0.5, 0.8), "the grid of density"),
        Param("scales", (1.0,), "the grid of scale (TIES's own default is 1)"),
    )

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        ids = self._pool(candidates, ctx)
        loaders = self._loaders(ids, ctx)
        points = [
            {"density": float(d), "scale": float(s)} for d in self.options["densities"] for s in self.options["scales"]
        ]
        weights, correct, params, grid = self._choose(
            ctx, points, lambda density, scale: ties_merge(ctx.base, loaders, density, scale)
        )
        return RecipeResult(weights, ids, correct, {"candidates": self.options["candidates"], **params}, grid)


@register_soup_method
class Dare(WeightRecipe):
    """DARE: drop task-vector entries at random, rescale the rest, average; drop rate and scale on held-out."""

    name = "dare"
    doc = "DARE (Yu et al. 2023): seeded random drop with 1/(1-p) rescale, then the mean task vector times scale"
    params = (
        _CANDIDATES,
        Param("drop_rates", (0.3, 0.6, 0.9), "the grid of drop rate"),
        Param("scales", (1.0, 1.5), "the grid of scale"),
        Param("seed", 0, "seed of the random drop"),
    )

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        ids = self._pool(candidates, ctx)
        loaders = self._loaders(ids, ctx)
        seed = int(self.options["seed"])
        points = [
            {"drop_rate": float(p), "scale": float(s)}
            for p in self.options["drop_rates"]
            for s in self.options["scales"]
        ]
        weights, correct, params, grid = self._choose(
            ctx, points, lambda drop_rate, scale: dare_merge(ctx.base, loaders, drop_rate, scale, seed)
        )
        return RecipeResult(
            weights, ids, correct, {"candidates": self.options["candidates"], **params, "seed": seed}, grid
        )


@register_soup_method
class Learned(WeightRecipe):
    """The learned soup: one mixing coefficient per model, fitted on held-out cross-entropy (ingredients frozen)."""

    name = "learned"
    doc = "mixing coefficients (softmax, from the uniform soup) fitted by Adam on held-out cross-entropy"
    by_layer = False
    params = (
        _CANDIDATES,
        Param("epochs", 20, "full-batch steps on the held-out split"),
        Param("lr", 0.05, "Adam learning rate of the coefficients' logits"),
    )

    def merge(self, candidates: Iterable[Candidate], ctx: RecipeContext) -> RecipeResult:
        if ctx.loss_and_grad is None:
            raise SoupError(f"soup method {self.name!r} needs a held-out loss and gradient")
        ids = self._pool(candidates, ctx)
        fitted = fit_learned_soup(
            self._loaders(ids, ctx),
            ctx.loss_and_grad,
            by_layer=self.by_layer,
            epochs=int(self.options["epochs"]),
            lr=float(self.options["lr"]),
            log=lambda e, loss: ctx.log(f"  {self.name} step {e + 1}: held-out loss {loss:.4f}"),
        )
        correct = ctx.score(fitted.weights)
        alpha = fitted.alpha if self.by_layer else dict(zip(ids, fitted.alpha, strict=True))
        return RecipeResult(
            fitted.weights, ids, correct, dict(self.options), extra={"alpha": alpha, "losses": fitted.losses}
        )


@register_soup_method
class LearnedByLayer(Learned):
    """The learned soup with one coefficient per model per parameter tensor."""

    name = "learned_by_layer"
    doc = "the learned soup with one coefficient per model and per parameter tensor"
    by_layer = True
