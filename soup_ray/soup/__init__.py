"""Model-soup mathematics: weight averaging, greedy/uniform soups, the incremental soup, ensembles, recipes.

Everything here is pure (the standard library and torch): no Ray, no I/O. The
soup algorithms work on candidate *ids* and an evaluator callback; only the
averaging and the ensembles touch tensors.

- ``base``: candidates, evaluation results, decisions, ``SoupError``
- ``average``: the streaming weight average
- ``greedy``: the greedy rule, early rejection, greedy/uniform/best soups
- ``incremental``: the exact incremental greedy soup and its persisted state
- ``ensemble``: logit ensembles
- ``methods``: the recipe objects and their registry
- ``merges``, ``learned``: task-vector merges and the learned soup (pure functions)
- ``recipes``: the weight recipes built on them (WiSE-FT, Model Stock, task arithmetic, TIES, DARE, learned)
- ``geometry``: interpolation, barriers and distances from the base
"""

from .average import RunningAverage, average_state_dicts
from .base import Candidate, EvalResult, Evaluate, GreedyResult, SoupError, Step, Tie, sort_candidates
from .ensemble import greedy_ensemble, logit_ensemble
from .greedy import (
    accept,
    batch_greedy_cost,
    best_candidate,
    early_rejection_evaluate,
    greedy_in_order,
    greedy_soup,
    max_wrong_for,
    uniform_soup,
)
from .incremental import IncrementalGreedySoup, Update
from .methods import (
    SOUP_METHODS,
    Param,
    SoupMethod,
    configure_soup_method,
    get_soup_method,
    greedy_method,
    register_soup_method,
    soup_method_class,
)
from .recipes import RecipeContext, RecipeResult, WeightRecipe

__all__ = [
    "SoupError",
    "Tie",
    "Candidate",
    "EvalResult",
    "Evaluate",
    "Step",
    "GreedyResult",
    "Update",
    "RunningAverage",
    "average_state_dicts",
    "sort_candidates",
    "accept",
    "max_wrong_for",
    "early_rejection_evaluate",
    "greedy_soup",
    "greedy_in_order",
    "batch_greedy_cost",
    "uniform_soup",
    "best_candidate",
    "IncrementalGreedySoup",
    "logit_ensemble",
    "greedy_ensemble",
    "Param",
    "SoupMethod",
    "SOUP_METHODS",
    "register_soup_method",
    "get_soup_method",
    "configure_soup_method",
    "soup_method_class",
    "greedy_method",
    "RecipeContext",
    "RecipeResult",
    "WeightRecipe",
]
