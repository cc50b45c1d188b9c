"""The garbage collector of a long-running service (validator, processors, nodes, IoT hosts).

CPython's cyclic collector walks every object of a generation each time it collects it. A host
of 500 IoT nodes, a compute node or the validator keeps a few million objects for its whole life,
and with the default thresholds (a young collection every 700 allocations) the oldest generation
was walked every few seconds, ~230 ms each time: at 1,000 participants garbage collection was
about a sixth of the machine's CPU. So a service, as large Python services commonly do:

- collects its young generation every YOUNG_EVERY allocations rather than 700, so the short-lived
  objects of a block's work are mostly freed by reference counting before a collection looks;
- once started, moves what exists then (modules, keys, data shards, connections) out of the
  collector's sight for good (gc.freeze): it lives as long as the process does.

Reference cycles are still collected, only less often.
"""

from __future__ import annotations

import gc
import logging

LOGGER = logging.getLogger(__name__)

YOUNG_EVERY = 50_000  # allocations (less deallocations) between collections of the youngest generation


def for_a_service() -> None:
    """Thresholds for a process that runs for hours; called as a service starts."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_EVERY, middle, oldest)


def settle() -> None:
    """Once a service has started: what exists now is never walked by the collector again."""
    gc.collect()
    gc.freeze()
    LOGGER.info("garbage collector: %d objects set aside after start-up; young collections every %d "
                "allocations", gc.get_freeze_count(), gc.get_threshold()[0])
