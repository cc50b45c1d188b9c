"""trustmesh-schedule's secure-aggregation actions (fl/secagg.py is the protocol, fl/secagg_block.py
the workflow block). Each participant writes only its own record,

    secagg_address(sid, node)  {schedule_id, node, c_pk, s_pk
                                [, self_commitment, sealed: {holder: {b, s}}, digests: {holder: {b, s}}]
                                [, revealed: {sender: share}]}

    secagg_keys    {schedule_id, c_pk, s_pk}            its two X25519 public keys, while the round
                                                        collects (sent in the batch of its submit)
    secagg_shares  {schedule_id, self_commitment, sealed, digests}
                                                        once the round is ready: its Shamir shares
                                                        of b and s_sk sealed for exactly its
                                                        neighbours, their sha256, and sha256(b)
    secagg_unmask  {schedule_id, shares: {sender: share}}
                                                        once every local_train of the round is
                                                        settled (every masked upload fixed), from
                                                        a signer whose own upload is in: for
                                                        each neighbour, the share it sealed for the
                                                        signer, of b if it uploaded, of its mask
                                                        key s_sk if its local_train was dropped;
                                                        it must hash to what that neighbour
                                                        published; a wrong one is refused, naming
                                                        the signer

A round where fewer than `threshold` participants uploaded, or whose unmask step stays short of
`threshold` shares for some participant, ends as timeout (unmask_stalled). The conditions
themselves (a wrong share, too few uploads, too few shares) are fl/secagg_block.py's.

Reads: the round (who submitted: federation_records; keys reads the core and the signer's member
record only), the workflow (the block), task statuses, the records of
the round's participants (the secagg prefix). Pure apart from the reads and writes.
"""

from __future__ import annotations

import re
from typing import Mapping

from trustmesh.fl import secagg_block
from trustmesh.ledger.processor import InvalidTransaction

from . import definition, federation_records, layout
from .common import HEX64, read_record, read_records, require, require_match, shown, write_records
from .schedule.spec import SETTLED

X25519_HEX = HEX64  # a raw X25519 public key: 32 bytes
SEALED = re.compile(r"\A[0-9a-f]{98}\Z")   # AES-GCM-SIV of a 33-byte share: 49 bytes
SHARE = re.compile(r"\A[0-9a-f]{66}\Z")    # holder index + two 16-byte halves
KINDS = ("b", "s")


async def secure_round(context, schedule_id: str, *, whole: bool = True) -> tuple[dict, dict]:
    """(round record, secure_aggregation block) or InvalidTransaction. whole: the round with its
    lists (federation_records.assemble); else its core alone."""
    record = await (federation_records.read_round(context, schedule_id) if whole
                    else read_record(context, layout.round_address(schedule_id)))
    if record is None:
        raise InvalidTransaction(f"no round with schedule id {schedule_id!r} on chain")
    workflow = await read_record(context, layout.workflow_address(record["workflow_id"])) or {}
    block = definition.secure_aggregation(workflow.get("definition"))
    if block is None:
        raise InvalidTransaction(f"workflow {record['workflow_id']!r} does not aggregate securely; it takes no "
                                 f"secure-aggregation messages")
    return record, block


async def keys(body: Mapping, signer: str, context, schedule_id: str) -> None:
    record, _ = await secure_round(context, schedule_id, whole=False)  # every participant sends keys: O(1) each
    c_pk = require_match(body, "c_pk", X25519_HEX, "an X25519 public key (64 lowercase hex)")
    s_pk = require_match(body, "s_pk", X25519_HEX, "an X25519 public key (64 lowercase hex)")
    if await read_record(context, layout.round_member_address(schedule_id, signer)) is None:  # not expected
        raise InvalidTransaction(f"node {signer} is not a participant of round {schedule_id!r}")
    if record["status"] != "collecting":
        raise InvalidTransaction(f"round {schedule_id!r} is {record['status']}: keys are advertised while it "
                                 f"collects, with the submission")
    address = layout.secagg_address(schedule_id, signer)
    if await read_record(context, address) is not None:
        raise InvalidTransaction(f"node {signer} already advertised its keys for round {schedule_id!r}")
    await write_records(context, {address: {"schedule_id": schedule_id, "node": signer, "c_pk": c_pk, "s_pk": s_pk}})


async def shares(body: Mapping, signer: str, context, schedule_id: str) -> None:
    record, block = await secure_round(context, schedule_id)
    if record["status"] != "ready":
        raise InvalidTransaction(f"round {schedule_id!r} is {record['status']}: shares go out once it is ready "
                                 f"(its participants fixed)")
    if signer not in record["submitted_nodes"]:
        raise InvalidTransaction(f"node {signer} did not submit to round {schedule_id!r}")
    address = layout.secagg_address(schedule_id, signer)
    own = await read_record(context, address)
    if own is None:
        raise InvalidTransaction(f"node {signer} advertised no keys for round {schedule_id!r}")
    if "sealed" in own:
        raise InvalidTransaction(f"node {signer} already sent its shares for round {schedule_id!r}")
    holders = secagg_block.neighbours(schedule_id, record["submitted_nodes"], block["neighbours"])[signer]
    commitment = require_match(body, "self_commitment", HEX64, "sha256 of its self-mask seed (64 lowercase hex)")
    sealed, digests = require(body, "sealed", dict), require(body, "digests", dict)
    for name, value, pattern in (("sealed", sealed, SEALED), ("digests", digests, HEX64)):
        if sorted(value) != holders:
            raise InvalidTransaction(f"payload field {name!r} must name exactly the signer's {len(holders)} "
                                     f"neighbours in round {schedule_id!r}")
        for holder, pair in value.items():
            if not isinstance(pair, dict) or sorted(pair) != list(KINDS) or not all(
                    isinstance(pair[k], str) and pattern.match(pair[k]) for k in KINDS):
                raise InvalidTransaction(f"payload field {name!r}: the entry for {holder} must be {{b, s}} of "
                                         f"{'sealed shares' if name == 'sealed' else 'sha256 digests'}; got {shown(pair)}")
    await write_records(context, {address: {**own, "self_commitment": commitment, "sealed": dict(sealed),
                                            "digests": dict(digests)}})


async def unmask(body: Mapping, signer: str, context, schedule_id: str, uploads: Mapping[str, str]) -> None:
    """uploads: participant -> the status of its local_train (done: it uploaded; dropped: it did not)."""
    record, block = await secure_round(context, schedule_id)
    if signer not in record["submitted_nodes"]:
        raise InvalidTransaction(f"node {signer} did not submit to round {schedule_id!r}")
    pending = sum(status not in SETTLED for status in uploads.values())
    if pending:
        raise InvalidTransaction(f"shares are revealed once every local_train of round {schedule_id!r} is settled: "
                                 f"done, or dropped by the coordinator past its deadline (a dropped upload counts "
                                 f"as settled); {pending} are not yet, reveal after them")
    if uploads.get(signer) != "done":
        raise InvalidTransaction(f"node {signer}'s own upload in round {schedule_id!r} was dropped: only participants "
                                 f"whose masked update is in the sum reveal shares")
    revealed = require(body, "shares", dict)
    graph = secagg_block.neighbours(schedule_id, record["submitted_nodes"], block["neighbours"])
    address = layout.secagg_address(schedule_id, signer)
    own = await read_record(context, address)
    if own is None:
        raise InvalidTransaction(f"node {signer} advertised no keys in round {schedule_id!r}, so it holds no shares "
                                 f"to reveal")
    if "revealed" in own:
        raise InvalidTransaction(f"node {signer} already revealed its shares in round {schedule_id!r}; each "
                                 f"participant reveals once")
    senders = {layout.secagg_address(schedule_id, s): s for s in revealed if s in graph.get(signer, ())}
    if len(senders) != len(revealed):
        raise InvalidTransaction(f"payload field 'shares' names nodes that are not {signer}'s neighbours in "
                                 f"round {schedule_id!r}")
    found = await read_records(context, list(senders))
    for sender_address, sender in senders.items():
        share = revealed[sender]
        kind, what = ("b", "self-mask") if uploads.get(sender) == "done" else ("s", "mask key")
        published = ((found.get(sender_address) or {}).get("digests") or {}).get(signer, {}).get(kind)
        if not isinstance(share, str) or not SHARE.match(share):
            raise InvalidTransaction(f"the share of {sender}'s secret must be 66 lowercase hex; got {shown(share)}")
        wrong = secagg_block.wrong_share(bytes.fromhex(share), published, sender=sender, holder=signer, what=what)
        if wrong:
            raise InvalidTransaction(wrong)
    await write_records(context, {address: {**own, "revealed": dict(revealed)}})


async def unmask_stalled(context, record: Mapping, now: int) -> str:
    """Why a ready, securely aggregated round may end as timeout (trustmesh-federation close_round):
    every upload is settled and either fewer than `threshold` participants uploaded (at once: no
    sum may be published), or round_timeout seconds passed since the last one and some
    participant's secret still has fewer than `threshold` shares revealed. Else
    InvalidTransaction saying why not."""
    schedule_id = record["schedule_id"]
    _, block = await secure_round(context, schedule_id, whole=False)  # the caller passed the round
    assignments = await read_record(context, layout.assignments_address(schedule_id))
    if assignments is None:
        raise InvalidTransaction(f"round {schedule_id!r} is not assigned yet; it cannot stall in its unmask step")
    tasks = assignments["tasks"]
    addresses = {layout.task_status_address(schedule_id, t): t for t in tasks}
    statuses = {addresses[a]: s for a, s in (await read_records(context, list(addresses))).items()}
    trains = [t for t, task in tasks.items() if task["kind"] == "local_train"]
    if any((statuses.get(t) or {}).get("status") not in SETTLED for t in trains):
        raise InvalidTransaction(f"round {schedule_id!r} still waits for uploads, not for its unmask step")
    if any(task["kind"] == "aggregate" and (statuses.get(t) or {}).get("status") == "done" for t, task in tasks.items()):
        raise InvalidTransaction(f"round {schedule_id!r} was aggregated; it did not stall")
    too_few = secagg_block.too_few_uploads(sum(statuses[t]["status"] == "done" for t in trains), block["threshold"])
    if too_few:
        return too_few
    last = max((entry["at"] for t in trains for entry in statuses[t].get("history", [])
                if entry["status"] in SETTLED), default=record["round_start"])
    deadline = last + record["round_timeout"]
    if now < deadline:
        raise InvalidTransaction(f"round {schedule_id!r}'s unmask step has {deadline - now} s left (round_timeout "
                                 f"{record['round_timeout']} s after its last upload); close it after that")
    participants = record["submitted_nodes"]
    found = await read_records(context, [layout.secagg_address(schedule_id, n) for n in participants])
    short = secagg_block.short_of_shares(participants, secagg_block.revealed_by_sender({r["node"]: r for r in found.values()}), block["threshold"])
    if not short:
        raise InvalidTransaction(f"every participant of round {schedule_id!r} has {block['threshold']} shares "
                                 f"revealed; its aggregate goes ahead")
    count, node = short[0]
    return (f"secure aggregation: only {count} of the {block['threshold']} shares needed to unmask participant "
            f"{node} were revealed within {record['round_timeout']} s of the last upload"
            + (f" ({len(short) - 1} more participant(s) short too)" if len(short) > 1 else ""))
