"""Turn the config's search space into Ray Tune search-space objects."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search.sample import Float, _BackwardsCompatibleNumpyRng
from ray.tune.search.sample import Uniform as _UniformSampler

from ..config import Choice, Const, LogUniform, RandInt, SearchSpace, Uniform


class _SometimesOff(_UniformSampler):
    """Uniform on the domain, except that with probability ``p_off`` the value is ``off_value``.

    The paper's sweep draws label smoothing and mixup as "off, or uniform up to x";
    sampling through Tune's own ``random_state`` keeps the sweep reproducible.
    """

    def __init__(self, p_off: float, off_value: float):
        self.p_off, self.off_value = p_off, off_value

    def sample(self, domain: Float, config: Any = None, size: int = 1, random_state: Any = None):  # type: ignore[override]
        if not isinstance(random_state, _BackwardsCompatibleNumpyRng):
            random_state = _BackwardsCompatibleNumpyRng(random_state)
        off = random_state.uniform(0.0, 1.0, size=size) < self.p_off
        values = random_state.uniform(domain.lower, domain.upper, size=size)
        values[off] = self.off_value
        return list(values) if size > 1 else float(values[0])

    def __str__(self) -> str:
        return f"SometimesOff(p_off={self.p_off})"


def to_tune(dist: Any) -> Any:
    """One config distribution -> a Tune domain (or a constant)."""
    if isinstance(dist, Const):
        return dist.value
    if isinstance(dist, Choice):
        return tune.choice(list(dist.choice))
    if isinstance(dist, LogUniform):
        return tune.loguniform(*dist.loguniform)
    if isinstance(dist, RandInt):
        return tune.randint(dist.randint[0], dist.randint[1] + 1)  # Tune's upper bound is exclusive
    if isinstance(dist, Uniform):
        if dist.p_off > 0:
            domain = Float(*dist.uniform)
            domain.set_sampler(_SometimesOff(dist.p_off, dist.off_value))
            return domain
        return tune.uniform(*dist.uniform)
    raise TypeError(f"unsupported distribution {dist!r}")


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The Tune ``param_space`` for a sweep, plus a per-trial ``seed``."""
    out = {name: to_tune(getattr(space, name)) for name in type(space).model_fields}
    out["seed"] = tune.randint(0, 2**31 - 1)
    return out
