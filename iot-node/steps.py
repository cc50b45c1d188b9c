"""What an IoT node's parts share: doing a step once, and how many rounds a workflow runs."""

from __future__ import annotations

from trustmesh.fl import dp_round, privacy_block


def planned(definition: dict) -> dict:
    """The federation section with the rounds the workflow will run: fewer than its `rounds`
    when its privacy budget runs out first (privacy_block.planned_rounds)."""
    return {**definition["federation"], "rounds": privacy_block.planned_rounds(definition)}


async def rounds_to_run(reader, workflow_id: str, definition: dict, index: dict | None = None) -> int:
    """The rounds a workflow runs as the chain stands: planned() rounds, or the rounds opened so
    far once the epsilon their results recorded (a client-noised round that averaged fewer
    updates than planned spends more) leaves no budget for one more (privacy_block.rounds_to_run)."""
    if not definition.get("privacy"):
        return planned(definition)["rounds"]
    index = index or await reader.rounds(workflow_id)
    opened = index["latest"]
    recorded = await dp_round.earlier_multipliers(reader, workflow_id, opened + 1)
    return privacy_block.rounds_to_run(definition, opened, recorded)


async def claimed(claims: set, key, commit) -> None:
    """Run commit() (True once committed) unless `key` is claimed. The claim is taken before any
    wait, since a block's reaction and a full check may both get here, and kept only on success."""
    if key in claims:
        return
    claims.add(key)
    committed = False
    try:
        committed = await commit()
    finally:
        if not committed:
            claims.discard(key)
