"""`trustmesh workflow list` and `trustmesh workflow show ID`: what is deployed, and how far each
workflow got, read from the chain at one head (the dashboard's views, as text or JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from trustmesh import endpoints as network
from trustmesh.dashboard import pages, views


class InfoError(Exception):
    """The workflow asked for is not on chain; the message says what is."""


async def _read(rest_url: str):
    async with network.command_rest_client(rest_url) as rest:
        return await views.read_snapshot(rest)


def _names(snap: views.Snapshot, home) -> dict[str, str]:
    return views.node_names(snap, None, network.local_network(home))


def list_text(rows: list[dict], block: int) -> str:
    if not rows:
        return (f"no workflow on chain (block {block}); `trustmesh workflow deploy FILE` or `trustmesh run FILE` "
                f"puts one there")
    table = [("WORKFLOW", "VERSION", "ROUNDS", "STATE", "STRATEGY", "PARTICIPANTS", "ACCURACY", "OWNER")]
    for w in rows:
        table.append((w["workflow_id"], str(w["version"]),
                      f"{w['rounds_done']}/{w['rounds_total']}" if w["federated"] else "single-node",
                      w["state"], pages.strategy_text(w["strategy"]) if w["strategy"] else "–",
                      str(len(w["participants"])),
                      f"{w['accuracy']:.4f}" if w["accuracy"] is not None else "–", views.short(w["owner"], 12)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines) + f"\n(chain head: block {block})"


def show_text(detail: dict) -> str:
    lines = [f"workflow {detail['workflow_id']}" + (f" — {detail['name']}" if detail.get("name") else ""),
             f"  version {detail['version']}, owner {detail['owner']}",
             f"  state: {detail['state']}"]
    if detail["federated"]:
        lines += [f"  rounds: {detail['rounds_done']}/{detail['rounds_total']} final",
                  f"  strategy: {pages.strategy_text(detail['strategy'])}",
                  f"  participants ({len(detail['participants'])}): "
                  + ", ".join(p["name"] for p in detail["participants"]),
                  f"  coordinator: {detail['coordinator']['name'] if detail['coordinator'] else '–'}"]
        if detail.get("update_checks"):
            lines.append("  update checks: " + ", ".join(f"{k} {v}" for k, v in detail["update_checks"].items()))
        if detail.get("privacy"):
            block = detail["privacy"]
            spent = f", {detail['epsilon']:.4g} spent" if detail.get("epsilon") is not None else ""
            lines.append(f"  privacy: {block.get('mechanism')}, epsilon budget {block.get('epsilon_budget')} (delta "
                         f"{block.get('delta')}){spent}; it allows {detail['rounds_total']} of "
                         f"{detail['rounds_configured']} rounds")
    lines += ["definition:", *("  " + line for line in json.dumps(detail["definition"], indent=2,
                                                                   sort_keys=True).splitlines())]
    if detail["federated"]:
        lines.append("rounds:")
        if not detail["rounds"]:
            lines.append("  none opened yet")
        for r in detail["rounds"]:
            parts = [f"  round {r['number']:>3}  {r['phase']:<10}  submitted {r['submitted']}/{r['expected']}"]
            if r["global_model"]:
                parts.append(f"aggregated {r['included']}")
            if r["rejected"]:
                parts.append(f"rejected {len(r['rejected'])} ({', '.join(sorted(r['rejected']))})")
            if r["accuracy"] is not None:
                parts.append(f"accuracy {r['accuracy']:.4f}")
            if r["loss"] is not None:
                parts.append(f"loss {r['loss']:.4f}")
            if r["epsilon"] is not None:
                parts.append(f"ε {r['epsilon']:.3f}")
            if r["global_model"]:
                parts.append(f"model {r['global_model'][:16]}…")
            lines.append(" · ".join(parts))
    lines.append(f"(chain head: block {detail['block']})")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    where = network.from_args(args)
    snap = asyncio.run(_read(where.rest))
    rows = views.workflows(snap, _names(snap, args.home))
    if args.json:
        print(json.dumps({"block": snap.block_num, "head": snap.head_id, "workflows": rows}, indent=2,
                         ensure_ascii=False))
    else:
        print(list_text(rows, snap.block_num))
    return 0


def run_show(args: argparse.Namespace) -> int:
    where = network.from_args(args)
    snap = asyncio.run(_read(where.rest))
    if args.workflow_id not in snap.workflows:
        known = ", ".join(sorted(snap.workflows)) or "none"
        print(f"trustmesh workflow show: workflow {args.workflow_id!r} is not on chain at block {snap.block_num} "
              f"(deployed: {known})", file=sys.stderr)
        return 2
    detail = views.workflow_detail(snap, args.workflow_id, _names(snap, args.home))
    print(json.dumps(detail, indent=2, ensure_ascii=False) if args.json else show_text(detail))
    return 0


def register(workflow_subparsers) -> None:
    """`workflow list` and `workflow show`, beside `workflow deploy` and `workflow schema`."""
    listing = workflow_subparsers.add_parser("list", help="every workflow on chain: state, rounds done / total, "
                                                          "strategy, participants, latest accuracy")
    listing.add_argument("--json", action="store_true", help="machine-readable")
    network.add_endpoint_flags(listing, ("rest",))
    listing.set_defaults(func=run_list)
    show = workflow_subparsers.add_parser("show", help="one workflow: definition, version, owner, every round")
    show.add_argument("workflow_id", metavar="ID", help="workflow_id of a deployed workflow")
    show.add_argument("--json", action="store_true", help="machine-readable")
    network.add_endpoint_flags(show, ("rest",))
    show.set_defaults(func=run_show)
