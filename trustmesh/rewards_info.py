"""`trustmesh rewards WORKFLOW` (its escrow, and what each round paid to whom), `trustmesh rewards
WORKFLOW --refund` (the owner takes back what is left once the workflow ended or went quiet, e.g.
after `trustmesh run` stopped early) and `trustmesh balance [KEY]` (one account, or every account
and escrow), read from the chain."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from trustmesh import endpoints as network
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.rest_client import refusal
from trustmesh.rewards_audit import all_balances, final_unsettled, workflow_rewards
from trustmesh.scheduling import rewards as rewards_family
from trustmesh.scheduling.reader import FederationReader


async def _rewards(rest_url: str, workflow_id: str) -> dict:
    async with network.command_rest_client(rest_url) as rest:
        return await workflow_rewards(FederationReader(rest), workflow_id)


async def _balances(rest_url: str) -> tuple[dict, dict]:
    async with network.command_rest_client(rest_url) as rest:
        return await all_balances(FederationReader(rest))


async def refund(rest, owner, workflow_id: str) -> str:
    """Settle each final round nobody has settled yet (anyone may; the escrow pays what it still
    can), then send the owner's refund. -> the line to show; RunError with the chain's reason
    when it refuses (the workflow has not ended, or the key is not the owner's)."""
    from trustmesh.workflow_runs import RunError

    reader = FederationReader(rest)
    escrow = await reader.escrow(workflow_id)
    if escrow is None:
        raise RunError(f"workflow {workflow_id!r} has no escrow on chain: nothing to take back "
                       f"(`trustmesh workflow list` shows the workflows deployed)")
    if escrow.get("refunded"):
        return f"rewards: the escrow of {workflow_id} was refunded already ({escrow['refunded']} back to the owner)"

    async def send(txn) -> dict:
        [status] = await rest.wait_for_batches(await rest.submit_batches([make_batch(owner, [txn])]), 60,
                                               raise_invalid=False)
        return status

    for sid in await final_unsettled(reader, workflow_id):
        await send(rewards_family.make_settle_transaction(owner, sid, workflow_id))  # refused once the budget is spent
    status = await send(rewards_family.make_refund_transaction(owner, workflow_id))
    if status["status"] != "COMMITTED":
        raise RunError(f"the escrow of {workflow_id} was not refunded: {refusal(status)}")
    escrow = await reader.escrow(workflow_id)
    return (f"rewards: {escrow['paid']} paid over {len(escrow['settled'])} round(s), "
            f"{escrow['refunded']} back to the owner")


async def _refund(rest_url: str, key, workflow_id: str) -> str:
    async with network.command_rest_client(rest_url) as rest:
        return await refund(rest, key, workflow_id)


def rewards_text(workflow_id: str, found: dict) -> str:
    escrow = found["escrow"]
    if escrow is None:
        return f"workflow {workflow_id}: no escrow (its owner funds one with the rewards family's escrow action)"
    terms = escrow["terms"]
    lines = [f"workflow {workflow_id}: escrow {escrow['total']} by {escrow['owner']}",
             f"  per round {terms['per_round']}: data {terms['data_share'] / 100:g} %, compute "
             f"{terms['compute_share'] / 100:g} %, fee {terms['fee_share'] / 100:g} %",
             f"  paid {escrow['paid']}, remaining {escrow['remaining']}"
             + (f", refunded {escrow['refunded']}" if escrow.get("refunded") else "")]
    for row in found["rounds"]:
        settlement = row["settlement"]
        if settlement is None:
            lines.append(f"  round {row['round']} ({row['status']}): not settled")
            continue
        lines.append(f"  round {row['round']}: paid {settlement['amount']}")
        for key, parts in sorted(settlement["payouts"].items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"    {key}  {sum(parts.values()):>10}  " + ", ".join(f"{p} {v}" for p, v in sorted(parts.items())))
    return "\n".join(lines)


def run_rewards(args: argparse.Namespace) -> int:
    if args.refund:
        from trustmesh.workflow_runs import user_key

        owner = user_key(network.home_dir(args.home), args.key)
        print(asyncio.run(_refund(network.from_args(args).rest, owner, args.workflow_id)))
        return 0
    found = asyncio.run(_rewards(network.from_args(args).rest, args.workflow_id))
    print(json.dumps(found, indent=2) if args.json else rewards_text(args.workflow_id, found))
    return 0


def run_balance(args: argparse.Namespace) -> int:
    accounts, escrows = asyncio.run(_balances(network.from_args(args).rest))
    if args.key is not None:
        print(json.dumps({args.key: accounts.get(args.key, 0)}) if args.json else accounts.get(args.key, 0))
        return 0
    if args.json:
        print(json.dumps({"accounts": accounts, "escrows": escrows}, indent=2))
        return 0
    for key, balance in sorted(accounts.items(), key=lambda kv: -kv[1]):
        print(f"{key}  {balance:>12}")
    for workflow_id, remaining in sorted(escrows.items()):
        print(f"escrow {workflow_id}  {remaining:>12}")
    total = sum(accounts.values()) + sum(escrows.values())
    print(f"(balances plus escrows: {total}; 0 when every unit came from an escrow)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    rewards = subparsers.add_parser("rewards", help="a workflow's escrow and what each round paid to whom")
    rewards.add_argument("workflow_id", metavar="WORKFLOW")
    rewards.add_argument("--json", action="store_true", help="machine-readable")
    rewards.add_argument("--refund", action="store_true",
                         help="the owner takes back what the escrow has left (settling any final round first), "
                              "once the workflow ended or went quiet, e.g. after `trustmesh run` stopped early")
    rewards.add_argument("--key", help="with --refund: the owner's private key file (default HOME/keys/user.priv, "
                                       "the key `trustmesh run` deployed with)")
    network.add_endpoint_flags(rewards, ("rest",))
    rewards.set_defaults(func=run_rewards)
    balance = subparsers.add_parser("balance", help="an account's balance (KEY), or every account and escrow")
    balance.add_argument("key", metavar="KEY", nargs="?", help="a public key (66 hex)")
    balance.add_argument("--json", action="store_true", help="machine-readable")
    network.add_endpoint_flags(balance, ("rest",))
    balance.set_defaults(func=run_balance)
