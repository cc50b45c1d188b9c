"""The lineage rule: which global model a round trains from (one text for the processor, the nodes
and the audit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from .. import layout


class LineageUnknown(LookupError):
    """An earlier round has neither a global model on chain nor timed out: the model a round's
    training starts from is not decided yet (rounds overlap: round r is assigned while r-1 trains)."""


@dataclass(frozen=True)
class StartingModel:
    """The global model round `round` of a workflow trains from, as `starting_model` decides it.

    digest        the previous global model's sha256; None for the initial weights
    source_round  the round that produced it (None with the initial weights)
    inputs        every state address the rule read to decide it, in order: a local_train done
                  report declares them (make_report_transaction), so the processor can read them
    server_state_digest  the server optimizer's state that round left with it (its round
                  result's server_state_digest), where the next step starts; None: fresh state
    next_clipping_norm  what adaptive DP clipping chose in that round (its result's privacy
                  record), the norm this round clips at; None: the workflow's own
    """

    workflow_id: str
    round: int
    digest: str | None
    source_round: int | None = None
    inputs: tuple[str, ...] = ()
    server_state_digest: str | None = None
    next_clipping_norm: float | None = None

    @classmethod
    def of_previous_round(cls, workflow_id: str, round_number: int, schedule_id: str, digest: str,
                          server_state_digest: str | None = None,
                          next_clipping_norm: float | None = None) -> "StartingModel":
        """Round `round_number - 1` (schedule_id) has the global model `digest`: what the rule
        reads to find it. A node that reported that model itself knows it before it commits."""
        return cls(workflow_id, round_number, digest, round_number - 1,
                   (layout.workflow_rounds_address(workflow_id), layout.round_result_address(schedule_id)),
                   server_state_digest, next_clipping_norm)


async def starting_model(read: Callable[[str], Awaitable[Mapping | None]], workflow_id: str,
                         round_number: int) -> StartingModel:
    """The lineage rule, one text for the processor, the nodes and the audit: round r trains from
    the global model of the latest earlier round that has a round result (its model is fixed then;
    evaluation only makes it final), provided every round in between timed out (it produced no
    model); when no earlier round has one, from the initial weights. LineageUnknown while an
    earlier round has neither.

    The initial weights are build_model(definition.model, seed=hyperparameters.seed) (training.py):
    decided by the definition alone, yet no digest of them exists on chain, and computing one in a
    processor would need torch there (and the same float bits from every validator's build). So
    they are named by their absence: digest None, the report carries no base_model_digest.

    read(address) -> the record stored there, or None: a processor reads through its context,
    clients through the REST API, tests from a dict. Round 1 reads nothing."""
    inputs: list[str] = []

    async def get(address: str) -> Mapping | None:
        inputs.append(address)
        return await read(address)

    if round_number > 1:
        index = (await get(layout.workflow_rounds_address(workflow_id)) or {}).get("rounds") or {}
        for number in range(round_number - 1, 0, -1):
            sid = index.get(str(number))
            result = await get(layout.round_result_address(sid)) if isinstance(sid, str) else None
            if result is not None and result.get("global_model_digest"):
                return StartingModel(workflow_id, round_number, result["global_model_digest"], number, tuple(inputs),
                                     result.get("server_state_digest"),
                                     (result.get("privacy") or {}).get("next_clipping_norm"))
            record = await get(layout.round_address(sid)) if isinstance(sid, str) else None
            if record is None or record.get("status") != "timeout":
                raise LineageUnknown(f"round {number} of {workflow_id!r} has no global model on chain yet")
    return StartingModel(workflow_id, round_number, None, None, tuple(inputs))


def _short(digest: str) -> str:
    return f"{digest[:16]}…"


def lineage_problem(task_id: str, base: str | None, start: StartingModel) -> str | None:
    """Why a local_train that trained from `base` (None: the initial weights) breaks the lineage
    rule, or None when `base` is the model `start` names."""
    if base == start.digest:
        return None
    trained = f"model {_short(base)}" if base is not None else "the initial weights"
    if start.digest is None:
        expected = f"round {start.round} starts from the initial weights (no earlier round has a global model)"
    else:
        expected = f"round {start.source_round}'s global model is {_short(start.digest)}"
        skipped = list(range(start.source_round + 1, start.round))
        if skipped:
            expected += (f" (round {skipped[0]} timed out)" if len(skipped) == 1
                         else f" (rounds {skipped[0]}-{skipped[-1]} timed out)")
    return f"task {task_id} trained from {trained} but {expected}"
