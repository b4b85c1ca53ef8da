"""Soup recipes as method objects in a registry, each declaring its parameters (as mergekit's merge methods do).

A recipe is a class with a ``name``, a tuple of declared :class:`Param` and a
``__call__(candidates, evaluate, *, heldout_size, early_rejection)`` that
returns a :class:`GreedyResult`. ``get_soup_method(name, **options)`` builds a
configured instance; an unknown name or option fails with a message listing
what is allowed. The tie rule is a parameter of the greedy recipe and is read
back from the configured object (``method.tie``), never re-derived elsewhere.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .base import TIES, Candidate, Evaluate, GreedyResult, SoupError, Tie, sort_candidates
from .greedy import best_candidate, greedy_in_order, uniform_soup


@dataclass(frozen=True)
class Param:
    """One declared parameter of a soup recipe."""

    name: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any, method: str) -> Any:
        """The value, or a :class:`SoupError` naming the method, the parameter and what is allowed."""
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise SoupError(f"soup method {method!r}: {self.name}={value!r} is not allowed; choose one of {allowed}")
        return value


class SoupMethod:
    """Base class of the registered soup recipes; a configured instance is called on candidates."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **options: Any) -> None:
        declared = {p.name: p for p in self.params}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            allowed = ", ".join(declared) or "none"
            raise SoupError(
                f"soup method {self.name!r} has no parameter {', '.join(unknown)} (its parameters: {allowed})"
            )
        self.options: dict[str, Any] = {
            p.name: p.check(options[p.name] if options.get(p.name) is not None else p.default, self.name)
            for p in self.params
        }

    @property
    def tie(self) -> Tie | None:
        """The tie rule this recipe applies to greedy decisions (None when it makes none)."""
        return None

    def describe(self) -> dict[str, Any]:
        """The method name and its chosen parameters, for results files."""
        return {"method": self.name, **self.options}

    def __call__(
        self, candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int, early_rejection: bool = True
    ) -> GreedyResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


SOUP_METHODS: dict[str, type[SoupMethod]] = {}

_M = TypeVar("_M", bound=type[SoupMethod])


def register_soup_method(cls: _M) -> _M:
    """Class decorator registering a recipe under its ``name``."""
    if not cls.name:
        raise SoupError(f"{cls.__name__} has no name to register under")
    if cls.name in SOUP_METHODS:
        raise SoupError(f"soup method {cls.name!r} is already registered")
    SOUP_METHODS[cls.name] = cls
    return cls


def soup_method_class(name: str) -> type[SoupMethod]:
    """The registered class of ``name``; the error lists the valid names."""
    try:
        return SOUP_METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(SOUP_METHODS))
        raise SoupError(f"unknown soup method {name!r}; valid methods: {valid}") from None


def get_soup_method(name: str, **options: Any) -> SoupMethod:
    """A configured instance of the recipe ``name``.

    Options a recipe does not declare are an error, except ``None`` values
    (so a caller can pass an unset command-line option through).
    """
    cls = soup_method_class(name)
    declared = {p.name for p in cls.params}
    return cls(**{k: v for k, v in options.items() if k in declared or v is not None})


def configure_soup_method(name: str, options: Mapping[str, Any] | None = None, **common: Any) -> SoupMethod:
    """Like :func:`get_soup_method`, but ``common`` options are passed only to recipes that declare them.

    ``configure_soup_method(m, tie=args.tie)`` lets one command-line ``--tie``
    reach the greedy recipe and be ignored by ``uniform``.
    """
    cls = soup_method_class(name)
    declared = {p.name for p in cls.params}
    merged = {k: v for k, v in common.items() if k in declared}
    merged.update(options or {})
    return get_soup_method(name, **merged)


@register_soup_method
class Uniform(SoupMethod):
    """Average every candidate."""

    name = "uniform"
    doc = "the plain average of every admitted candidate"

    def __call__(
        self, candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int, early_rejection: bool = True
    ) -> GreedyResult:
        return uniform_soup(candidates, evaluate, heldout_size=heldout_size)


@register_soup_method
class Greedy(SoupMethod):
    """Greedy soup: add each candidate, best held-out first, when the soup does not get worse."""

    name = "greedy"
    doc = "greedy soup; tie '>=' keeps equal-accuracy soups as the paper does, '>' the reference code's strict rule"
    params = (
        Param(
            "tie",
            ">=",
            "accept a candidate when the soup's held-out accuracy is >= (or >) the current one",
            choices=TIES,
        ),
        Param(
            "order",
            "heldout",
            "consider candidates best held-out first (the paper's rule), or in a seeded "
            "random order (the paper's ablation)",
            choices=("heldout", "random"),
        ),
        Param("seed", 0, "seed of the random order"),
    )

    @property
    def tie(self) -> Tie:
        return self.options["tie"]

    def __call__(
        self, candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int, early_rejection: bool = True
    ) -> GreedyResult:
        ordered = sort_candidates(candidates)
        if self.options.get("order") == "random":
            random.Random(int(self.options["seed"])).shuffle(ordered)
        return greedy_in_order(
            ordered, evaluate, heldout_size=heldout_size, tie=self.tie, early_rejection=early_rejection
        )


@register_soup_method
class GreedyStrict(Greedy):
    """Greedy soup requiring a strict improvement (the reference code's rule)."""

    name = "greedy_strict"
    doc = "greedy soup with the strict rule '>'"
    params = ()

    @property
    def tie(self) -> Tie:
        return ">"


@register_soup_method
class Best(SoupMethod):
    """The best individual model."""

    name = "best"
    doc = "the best candidate on held-out, as a one-ingredient soup"

    def __call__(
        self, candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int, early_rejection: bool = True
    ) -> GreedyResult:
        return best_candidate(candidates, heldout_size=heldout_size)


def greedy_method(tie: Tie) -> SoupMethod:
    """The greedy recipe configured with ``tie``."""
    return get_soup_method("greedy", tie=tie)
