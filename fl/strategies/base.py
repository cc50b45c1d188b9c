"""What every aggregation strategy shares: the update it receives, the registry, the base class.

Shaped like Flower's Strategy, reduced to what a round needs: a strategy turns the round's
`ClientUpdate`s into one weight per node (`weights`) and `aggregate` averages the states with
those weights (averaging.py). A new strategy is one file in this folder with one subclass: a
`name` (subclassing registers it), its `parameters` (name -> Number, the bounds the workflow
rules and the JSON schema read from here) and a `_weights` method (updates arrive checked and
sorted by node). `strategy_from_spec` builds one from a workflow's `strategy` map.

Pure Python: the workflow processor validates strategy maps with this registry and never loads
torch. Only averaging.py (imported when a strategy aggregates) needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

if TYPE_CHECKING:  # a type only: importing torch here would load it into the processors
    import torch

WEIGHT_TOLERANCE = 1e-9  # what the schedule family allows for sum(weights) - 1


class StrategyError(ValueError):
    """A strategy spec or a set of updates that cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class ClientUpdate:
    """One node's result of local training."""

    node: str                              # the node's public key (or name, off chain)
    state: Mapping[str, "torch.Tensor"]    # name -> float32 tensor
    samples: int                           # training samples behind the update
    metrics: Mapping[str, Any] = field(default_factory=dict)  # incl. "accuracy" on its own data


@dataclass(frozen=True)
class Number:
    """A strategy parameter: a finite number within inclusive bounds (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    kind: ClassVar[str] = "number"  # the JSON Schema type, and which check the workflow rules apply

    def accepts(self, value: Any) -> bool:
        return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high))

    def describe(self) -> str:
        """What the parameter must be, in words: "a number between 0 and 1"."""
        what = "an integer" if self.kind == "integer" else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} between {self.low:g} and {self.high:g}"
        if self.low is not None:
            return f"{what} of at least {self.low:g}"
        return f"a finite {what[2:] if what.startswith('a ') else what[3:]}" + (
            f" of at most {self.high:g}" if self.high is not None else "")

    def schema(self) -> dict:
        """This parameter as a JSON Schema (draft 2020-12) fragment."""
        bounds = {"minimum": self.low, "maximum": self.high}
        return {"type": self.kind, **{k: v for k, v in bounds.items() if v is not None}}


@dataclass(frozen=True)
class Integer(Number):
    """A strategy parameter: an integer within inclusive bounds (both given)."""

    low: int = 0
    high: int = 1 << 31
    kind: ClassVar[str] = "integer"

    def accepts(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and self.low <= value <= self.high


STRATEGIES: dict[str, type["Strategy"]] = {}


class Strategy:
    """Base class. Subclasses set `name` and `parameters` and implement `_weights`."""

    name: ClassVar[str] = ""
    parameters: ClassVar[Mapping[str, Number]] = {}  # spec fields besides "name", with their bounds
    # A server optimizer (fedopt.py) moves the model the round trained from towards the combined
    # updates (`step`); one that keeps state between rounds leaves it in a blob the round result
    # names (server_state_digest), so the next round and the audit start from the same bits.
    uses_start: ClassVar[bool] = False
    keeps_state: ClassVar[bool] = False
    # A Byzantine-robust rule (median, trimmed mean, the Krum family): the dashboard lists the
    # workflow's rejected updates, an empty list included, for these.
    robust: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in STRATEGIES:
                raise TypeError(f"strategy {cls.name!r} is registered twice")
            STRATEGIES[cls.name] = cls

    def __init__(self, *args: Any, **values: Any):
        """The parameters, in their order or by name, each within its bounds (StrategyError
        otherwise), kept as attributes."""
        if len(args) > len(self.parameters):
            raise StrategyError(f"{self.name} takes {len(self.parameters)} parameter(s), got {len(args)}")
        values.update(zip(self.parameters, args))
        for name, bounds in self.parameters.items():
            value = values.pop(name)
            if not bounds.accepts(value):
                raise StrategyError(f"{self.name} {name} must be {bounds.describe()}; got {value!r}")
            setattr(self, name, value if bounds.kind == "integer" else float(value))
        if values:
            raise StrategyError(f"{self.name} takes no parameter(s) {', '.join(sorted(values))}")

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Strategy":
        return cls(**{p: spec[p] for p in cls.parameters})

    def spec(self) -> dict:
        return {"name": self.name, **{p: getattr(self, p) for p in self.parameters}}

    def weights(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """node -> weight >= 0, summing to 1 (within WEIGHT_TOLERANCE), in sorted node order."""
        from .averaging import check_updates

        return self._weights(check_updates(updates))

    def aggregate(self, updates: Sequence[ClientUpdate]):
        """(global state, weights): the strategy's weights, then `combine` with them."""
        from .averaging import check_updates

        ordered = check_updates(updates)
        weights = self._weights(ordered)
        return self.combine(ordered, weights), weights

    def combine(self, updates: Sequence[ClientUpdate], weights: Mapping[str, float]):
        """The global state from the updates and the weights the round result records: the
        weighted average, unless a strategy combines otherwise (a coordinate-wise median uses
        its weights only to say who took part). The audit calls it with the on-chain weights."""
        from .averaging import weighted_average

        return weighted_average({u.node: u.state for u in updates}, weights)

    def step(self, combined, start, previous: Mapping | None, updates: Sequence[ClientUpdate] = ()):
        """(global state, server state or None) from the combined updates, the model the round
        trained from (given when `uses_start`), the state the last round left (None: the first
        round, or a strategy without state) and the updates combined (checked, sorted by node).
        Most strategies' global model is `combined`; a round left short of what the rule's
        guarantee needs (`shortfall`) keeps the model it started from."""
        if not self.shortfall(len(updates)):
            return combined, None
        if start is None:
            raise StrategyError(f"{self.name}: the model the round started from is needed to keep it")
        return type(start)((name, tensor.clone()) for name, tensor in start.items()), None

    def _weights(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """The strategy itself: `updates` are checked and sorted by node."""
        raise NotImplementedError

    def rejections(self, weights: Mapping[str, float]) -> dict[str, str]:
        """node -> why, for the updates this rule leaves out (weight 0) when it chooses among them;
        recorded in the round result beside the update checks' rejections. None for most."""
        return {}

    def shortfall(self, n: int) -> str | None:
        """Why a round whose update checks let n updates through keeps the model it started from
        instead of combining them (a robust rule whose guarantee needs more: krum.py, median.py,
        trimmed_mean.py; such a rule sets `uses_start`), or None."""
        return None

    def training_options(self) -> dict:
        """What local training adds for this strategy (keyword arguments of training.local_train,
        e.g. FedProx's proximal_mu); nothing for most."""
        return {}

    @classmethod
    def federation_problem(cls, spec: Mapping, federation: Mapping) -> str | None:
        """Why this strategy, as `spec` configures it, cannot keep its guarantee in a federation
        so configured (e.g. Krum needs at least 2f + 3 updates in every round), or None. The
        workflow rules refuse such a definition at deploy time, not mid-round."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{p}={getattr(self, p)!r}' for p in self.parameters)})"


def sample_shares(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """node -> samples / sum(samples): FedAvg's weights, the base of others."""
    total = sum(u.samples for u in updates)  # integers: exact
    return {u.node: u.samples / total for u in updates}


def strategy_from_spec(spec: Any) -> Strategy:
    """The strategy a workflow's `strategy` map names, e.g. {"name": "perf_fedavg", "alpha": 0.5}."""
    if not isinstance(spec, Mapping) or spec.get("name") not in STRATEGIES:
        raise StrategyError(f"strategy.name must be one of {', '.join(sorted(STRATEGIES))}; got {spec!r:.80}")
    cls = STRATEGIES[spec["name"]]
    allowed = {"name", *cls.parameters}
    if set(spec) != allowed:
        raise StrategyError(
            f"strategy {spec['name']!r} takes exactly the fields {', '.join(sorted(allowed))}; "
            f"got {', '.join(sorted(map(str, spec)))}"
        )
    return cls.from_spec(spec)


def schema_of_strategies() -> dict:
    """The workflow schema's `strategy` definition, made from the registry."""
    names = sorted(STRATEGIES)
    cases = [{
        "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
        "then": {"additionalProperties": False,
                 **({"required": list(cls.parameters)} if cls.parameters else {}),
                 "properties": {"name": True, **{p: bound.schema() for p, bound in cls.parameters.items()}}},
    } for name, cls in sorted(STRATEGIES.items())]
    return {"type": "object", "required": ["name"], "properties": {"name": {"enum": names}}, "allOf": cases}
