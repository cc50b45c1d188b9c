"""Aggregation strategies, one file each, behind one registry (base.STRATEGIES).

The workflow rules (scheduling/workflow.py), the JSON schema it publishes, the compute node's
aggregate task and the audit all take the strategy names and their parameters from here, so a
new strategy is one file in this folder (a Strategy subclass) and nothing else: every module
here but base and averaging is imported, in name order, and registers its strategy.
Importing this package does not load torch (averaging.py does, when a strategy aggregates).
"""

import importlib
import pkgutil

from .base import (STRATEGIES, WEIGHT_TOLERANCE, ClientUpdate, Integer, Number, Strategy, StrategyError,
                   sample_shares, schema_of_strategies, strategy_from_spec)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "averaging"):
        importlib.import_module(f"{__name__}.{_module}")

from .fedavg import FedAvg  # noqa: E402  (the two strategies callers name directly)
from .perf_fedavg import PerfFedAvg  # noqa: E402


def __getattr__(name: str):
    # The torch half, loaded on first use: check_updates, weighted_average.
    if name in ("check_updates", "weighted_average"):
        from . import averaging

        return getattr(averaging, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STRATEGIES", "WEIGHT_TOLERANCE", "ClientUpdate", "Integer", "Number", "Strategy", "StrategyError", "FedAvg",
           "PerfFedAvg", "sample_shares", "schema_of_strategies", "strategy_from_spec", "check_updates",
           "weighted_average"]
