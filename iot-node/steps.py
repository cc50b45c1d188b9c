"""What an IoT node's parts share: doing a step once, and how many rounds a workflow runs."""

from __future__ import annotations

from trustmesh.fl import privacy_block


def planned(definition: dict) -> dict:
    """The federation section with the rounds the workflow will run: fewer than its `rounds`
    when its privacy budget runs out first (privacy_block.planned_rounds)."""
    return {**definition["federation"], "rounds": privacy_block.planned_rounds(definition)}


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
