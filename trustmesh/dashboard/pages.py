"""The dashboard's HTML: plain server-rendered pages, one stylesheet and one small script (live
updates: it re-reads the page's <main> when a block concerns it). No inline script or style,
so the Content-Security-Policy can forbid both."""

from __future__ import annotations

import datetime
import json
from html import escape
from typing import Any, Mapping, Sequence

from . import charts

STRATEGY_KEYS_HIDDEN = ("name",)


def e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return e(value)


def _time(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _clock(seconds: Any) -> str:
    """Chain time as HH:MM:SS, the date on hover."""
    if not isinstance(seconds, (int, float)):
        return "–"
    return f'<span title="{_time(seconds)}">{_time(seconds)[11:19]}</span>'


def _key(entry: Mapping | None) -> str:
    """A node by name, its full key on hover."""
    if not entry:
        return "–"
    return f'<span class="node" title="{e(entry.get("key"))}">{e(entry.get("name"))}</span>'


def _digest(value: Any) -> str:
    if not value:
        return "–"
    return f'<code title="{e(value)}">{e(str(value)[:12])}…</code>'


def strategy_text(strategy: Mapping | None) -> str:
    if not strategy:
        return "–"
    params = ", ".join(f"{k} {v}" for k, v in strategy.items() if k not in STRATEGY_KEYS_HIDDEN)
    return f"{strategy.get('name')}" + (f" ({params})" if params else "")


def _layout(title: str, body: str, *, watch: str, partial: bool) -> str:
    if partial:
        return body
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · TrustMesh FL</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-watch="{e(watch)}">
<header class="top">
<a class="brand" href="/">TrustMesh FL</a>
<nav><a href="/">Workflows</a><a href="/nodes">Nodes</a></nav>
<span id="live" class="live" title="live updates from the chain's block events">connecting…</span>
</header>
<main id="content">
{body}
</main>
</body>
</html>
"""


def _chain_strip(chain: Mapping) -> str:
    rate = chain.get("blocks_per_minute")
    observed = (chain.get("observed") or {}).get("blocks_last_minute")
    pending = chain.get("pending_batches")
    return (f'<p class="chain" id="chain-strip">chain head <b id="head-block" data-block="{e(chain.get("block"))}">'
            f'block {e(chain.get("block"))}</b> <code title="{e(chain.get("head"))}">'
            f'{e(str(chain.get("head"))[:12])}…</code> · {(f"{rate:.1f}" if rate is not None else "–")} blocks/min'
            + (f" (seen live: {observed} in the last minute)" if observed is not None else "")
            + f" · chain time {_time(chain.get('chain_time'))}"
            + (f" · {pending} pending batches" if pending is not None else "")
            + "</p>")


def _table(headers: Sequence[str], rows: Sequence[str], *, cls: str = "", empty: str = "none") -> str:
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _facts(items: Sequence[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# ------------------------------------------------------------------------------ workflows


def workflows_page(data: Mapping, chain: Mapping, *, partial: bool = False) -> str:
    rows = []
    for w in data["workflows"]:
        rounds = f"{w['rounds_done']}/{w['rounds_total']}" if w["federated"] else "–"
        rows.append(
            f'<tr data-workflow="{e(w["workflow_id"])}"><td><a href="/workflows/{e(w["workflow_id"])}">'
            f'{e(w["workflow_id"])}</a><div class="sub">{e(w.get("name"))}</div></td>'
            f'<td class="state">{e(w["state"])}</td><td class="rounds">{rounds}</td>'
            f'<td>{e(strategy_text(w["strategy"]))}</td><td>{len(w["participants"])}</td>'
            f'<td class="accuracy">{_num(w["accuracy"])}</td><td>{_num(w["epsilon"], 2)}</td>'
            f'<td>{e(w["version"])}</td><td><code title="{e(w["owner"])}">{e(str(w["owner"])[:12])}…</code>'
            f'</td></tr>')
    body = (_chain_strip(chain) + "<h1>Workflows</h1>"
            + _table(["workflow", "state", "rounds done", "strategy", "participants", "accuracy", "ε spent",
                      "version", "owner"], rows, cls="workflows",
                     empty="no workflow is deployed yet: `trustmesh workflow deploy FILE` or `trustmesh run FILE`"))
    return _layout("Workflows", body, watch="*", partial=partial)


def _rounds_table(detail: Mapping) -> str:
    rows = []
    for r in detail["rounds"]:
        rejected = len(r["rejected"])
        rows.append(
            f'<tr data-round="{r["number"]}"><td><a href="/workflows/{e(detail["workflow_id"])}/rounds/{r["number"]}">'
            f'round {r["number"]}</a></td><td class="phase phase-{e(r["phase"])}">{e(r["phase"])}</td>'
            f'<td>{r["submitted"]}/{r["expected"]}</td><td>{r["included"] if r["global_model"] else "–"}</td>'
            f'<td>{rejected or "–"}</td><td class="accuracy">{_num(r["accuracy"], 4)}</td>'
            f'<td>{_num(r["loss"], 4)}</td><td>{_num(r["train_loss"], 4)}</td><td>{_num(r["epsilon"], 3)}</td>'
            f'<td>{_digest(r["global_model"])}</td></tr>')
    return _table(["round", "phase", "submitted", "aggregated", "rejected", "test accuracy", "test loss",
                   "train loss", "ε", "global model"], rows, cls="rounds", empty="no round has opened yet")


def workflow_page(detail: Mapping, chain: Mapping, *, partial: bool = False) -> str:
    wid = detail["workflow_id"]
    rounds = detail["rounds"]
    total = detail["rounds_total"] or max([r["number"] for r in rounds] + [1])
    participants = ", ".join(_key(p) for p in detail["participants"]) or "–"
    facts = [("state", f'<span class="state">{e(detail["state"])}</span>'),
             ("rounds done", f'<span class="rounds">{detail["rounds_done"]}/{detail["rounds_total"]}</span>'
                             + (f' (federation.rounds {detail["rounds_configured"]}; the privacy budget allows '
                                f'{detail["rounds_total"]})' if detail.get("rounds_configured") not in
                                (None, detail["rounds_total"]) else "")),
             ("strategy", e(strategy_text(detail["strategy"]))),
             ("participants", f'{len(detail["participants"])}: {participants}'),
             ("coordinator", _key(detail["coordinator"])),
             ("expected / minimum", f'{e(detail.get("expected_nodes"))} / {e(detail.get("min_nodes_required"))} '
                                    f'(round timeout {e(detail.get("round_timeout"))} s)'),
             ("local training on", e(detail.get("train_on")))]
    if detail.get("update_checks"):
        facts.append(("update checks", e(", ".join(f"{k} {v}" for k, v in detail["update_checks"].items()))))
    if detail.get("privacy"):
        spent = detail.get("epsilon")
        budget = detail["privacy"].get("epsilon_budget")
        facts.append(("differential privacy", f'ε spent {_num(spent, 3)} of a budget of {e(budget)} (δ '
                                              f'{e(detail["privacy"].get("delta"))}) · <code>'
                                              f'{e(json.dumps(detail["privacy"], sort_keys=True))}</code>'))
    if detail.get("secure_aggregation"):
        facts.append(("secure aggregation", f'<code>{e(json.dumps(detail["secure_aggregation"], sort_keys=True))}'
                                            f'</code>'))
    facts += [("version", e(detail["version"])), ("owner", f'<code>{e(detail["owner"])}</code>')]
    parts = [_chain_strip(chain), f'<h1>Workflow {e(wid)}</h1>']
    if detail.get("name") or detail.get("description"):
        parts.append(f'<p class="lead">{e(detail.get("name"))}{" — " if detail.get("description") else ""}'
                     f'{e(detail.get("description"))}</p>')
    parts.append(_facts(facts))
    if detail["federated"]:
        accuracy = charts.line_chart("accuracy", "test accuracy by round", [
            charts.Series("accuracy", "test accuracy", charts.BLUE, [(r["number"], r["accuracy"]) for r in rounds]),
            charts.Series("train_accuracy", "train accuracy", charts.GREY,
                          [(r["number"], r["train_accuracy"]) for r in rounds]),
        ], rounds=total, y_label="accuracy", y_max=1.0)
        loss = charts.line_chart("loss", "loss by round", [
            charts.Series("loss", "test loss", charts.RED, [(r["number"], r["loss"]) for r in rounds]),
            charts.Series("train_loss", "train loss", charts.AMBER, [(r["number"], r["train_loss"]) for r in rounds]),
        ], rounds=total, y_label="loss")
        parts.append('<section class="charts">'
                     f'<figure><figcaption>Accuracy by round</figcaption>{accuracy}</figure>'
                     f'<figure><figcaption>Loss by round</figcaption>{loss}</figure>'
                     f'<figure><figcaption>Participation per round</figcaption>'
                     f'{charts.participation_chart(rounds, total=total)}</figure>')
        if any(r["epsilon"] is not None for r in rounds) or detail.get("privacy"):
            budget = (detail.get("privacy") or {}).get("epsilon_budget")
            epsilon = charts.line_chart("epsilon", "privacy spent (ε) by round", [
                charts.Series("epsilon", "ε spent", charts.PURPLE, [(r["number"], r["epsilon"]) for r in rounds])],
                rounds=total, y_label="ε",
                guide=("budget", float(budget)) if isinstance(budget, (int, float)) else None)
            parts.append(f'<figure><figcaption>Privacy spent (ε) by round</figcaption>{epsilon}</figure>')
        parts.append("</section>")
        rejected_rows = [f'<tr><td><a href="/workflows/{e(wid)}/rounds/{r["number"]}">round {r["number"]}</a></td>'
                         f'<td>{e(node)}</td><td>{e(reason)}</td></tr>'
                         for r in rounds for node, reason in sorted(r["rejected"].items())]
        if rejected_rows or _robust(detail):
            parts.append("<h2>Rejected updates</h2>" + _table(["round", "participant", "reason"], rejected_rows,
                                                              cls="rejected", empty="no update was rejected"))
        parts.append("<h2>Rounds</h2>" + _rounds_table(detail))
    else:
        parts.append('<p class="empty">a single-node workflow: it has no rounds on chain (`trustmesh run` trains it '
                     'where it runs)</p>')
    parts.append(f'<details><summary>definition (version {e(detail["version"])})</summary><pre>'
                 f'{e(json.dumps(detail["definition"], indent=2, sort_keys=True))}</pre></details>')
    return _layout(f"Workflow {wid}", "".join(parts), watch=wid, partial=partial)


def _robust(detail: Mapping) -> bool:
    from trustmesh.fl.strategies import STRATEGIES  # pure Python: the registry says which rules are robust

    kind = STRATEGIES.get((detail.get("strategy") or {}).get("name"))
    return bool(detail.get("update_checks")) or (kind is not None and kind.robust)


# ------------------------------------------------------------------------------ a round


def _audit_section(detail: Mapping, audit: Mapping | None, *, asked: bool) -> str:
    link = f'/workflows/{e(detail["workflow_id"])}/rounds/{detail["number"]}?audit=1'
    parts = ['<section class="audit" id="audit"><h2>Audit</h2>']
    if audit is None:
        parts.append(f'<p>trustmesh audit re-verifies signatures, signers, every blob against its on-chain digest and '
                     f'recomputes the aggregation. <a class="button" id="run-audit" href="{link}">Run the audit'
                     f'</a></p>')
        return "".join(parts) + "</section>"
    stale = audit["head"] != detail["head"]
    when = f'at block {e(audit["block"])} in {e(audit["seconds"])} s'
    if audit.get("error"):
        parts.append(f'<p class="bad">the audit could not run ({when}): {e(audit["error"])}</p>')
    else:
        report = audit["report"]
        mine = next((r for r in report["rounds"] if r["number"] == detail["number"]), None)
        if mine is None:
            parts.append(f'<p class="bad">the audit {when} has no round {detail["number"]}</p>')
        else:
            ok = mine["ok"] and not report["problems"]
            parts.append(
                f'<p class="verdict {"good" if ok else "bad"}" id="audit-verdict" data-ok="{str(ok).lower()}">'
                f'{"✓ every check passed" if ok else "✗ problems found"}: {mine["checks"]} checks of round '
                f'{detail["number"]} ({e(mine["status"])}), {report["checks"]} in all, {report["transactions"]} '
                f'transactions re-verified, {when}</p>')
            parts.append(_facts([("global model on chain", _digest(mine.get("global_model"))),
                                 ("recomputed aggregation", _digest(mine.get("recomputed_global_model"))),
                                 ("started from", _digest(mine.get("initial_model")) if mine.get("initial_model")
                                  else "the initial weights")]))
            problems = list(mine["problems"]) + list(report["problems"])
            if problems:
                parts.append("<ul class=\"problems\">" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    if stale:
        parts.append(f'<p>the chain has moved on since (block {e(detail["block"])}). '
                     f'<a class="button" id="run-audit" href="{link}">Audit again</a></p>')
    return "".join(parts) + "</section>"


def round_page(detail: Mapping, chain: Mapping, audit: Mapping | None, *, audit_asked: bool = False,
               partial: bool = False) -> str:
    wid, number = detail["workflow_id"], detail["number"]
    blocks = detail.get("blocks") or {}
    block_text = ", ".join(f"{k} in block {v}" for k, v in sorted(blocks.items(), key=lambda kv: kv[1])) or \
        "(not seen by this dashboard's event follower yet)"
    total = detail.get("rounds_total")
    nav = []
    if number > 1:
        nav.append(f'<a href="/workflows/{e(wid)}/rounds/{number - 1}">← round {number - 1}</a>')
    nav.append(f'<a href="/workflows/{e(wid)}">workflow {e(wid)}</a>')
    if total and number < total:
        nav.append(f'<a href="/workflows/{e(wid)}/rounds/{number + 1}">round {number + 1} →</a>')
    facts = [("phase", f'<span class="phase phase-{e(detail["phase"])}">{e(detail["phase"])}</span>'),
             ("schedule id", f'<code>{e(detail["schedule_id"])}</code>'),
             ("blocks", e(block_text)),
             ("coordinator", _key(detail["coordinator"])),
             ("workflow version", e(detail.get("workflow_version"))),
             ("submitted / expected", f'{detail["submitted"]}/{detail["expected"]} (minimum '
                                      f'{e(detail.get("min_nodes_required"))}, timeout '
                                      f'{e(detail.get("round_timeout"))} s)'),
             ("opened at", _time(detail.get("round_start")))]
    result = detail.get("result")
    if result:
        facts += [("global model", f'<code>{e(result.get("global_model_digest"))}</code>'),
                  ("reported by", _key(detail.get("reported_by"))),
                  ("result recorded at", _time(result.get("recorded_at"))),
                  ("final at", _time(result.get("finalized_at")) if result.get("final") else "not final yet"),
                  ("test accuracy / loss", f'<span class="accuracy">{_num(detail["accuracy"], 4)}</span> / '
                                           f'{_num(detail["loss"], 4)}'),
                  ("train accuracy / loss", f'{_num(detail["train_accuracy"], 4)} / {_num(detail["train_loss"], 4)}')]
        if detail.get("server_state_digest"):
            facts.append(("server optimizer state", f'<code>{e(detail["server_state_digest"])}</code>'))
        if detail.get("privacy"):
            facts.append(("privacy", f'ε {_num(detail.get("epsilon"), 4)} · <code>'
                                     f'{e(json.dumps(detail["privacy"], sort_keys=True))}</code>'))
    participants = [
        f'<tr><td>{_key(p)}</td><td>{"yes" if p["submitted"] else "no"}</td><td>{_num(p["samples"])}</td>'
        f'<td>{_digest(p["digest"])}</td><td>{_num(p["weight"], 4)}</td>'
        f'<td class="{"bad" if p["rejected"] else ""}">{e(p["rejected"]) if p["rejected"] else "–"}</td></tr>'
        for p in detail["participants"]]
    tasks = [
        f'<tr data-task="{e(t["task_id"])}"><td><code>{e(t["task_id"])}</code>'
        + (f'<div class="sub">data of {_key(t["data_owner"])}</div>' if t.get("data_owner") else "")
        + f'</td><td>{e(t["kind"])}</td>'
        f'<td>{_key(t["node"])}</td><td class="status status-{e(t["status"])}">{e(t["status"])}</td>'
        f'<td>{e(t["attempt"])}</td><td>{_clock(t["assigned_at"])}</td><td>{_clock(t["ended_at"])}</td>'
        f'<td>{_num(t["chain_seconds"], 0)}</td><td>{_num(t["task_seconds"], 3)}</td>'
        f'<td>{e(", ".join(f"{k} {v}" for k, v in sorted((t.get("block") or {}).items(), key=lambda kv: kv[1])))}'
        f'</td><td>{_digest(t["output_digest"])}</td></tr>'
        for t in detail["tasks"]]
    body = (_chain_strip(chain) + f'<p class="crumbs">{" · ".join(nav)}</p>'
            + f"<h1>{e(wid)} · round {number}</h1>" + _facts(facts)
            + "<h2>Participants</h2>"
            + _table(["node", "submitted", "samples", "submission", "weight", "rejected"], participants,
                     cls="participants")
            + "<h2>Tasks</h2>"
            + _table(["task", "kind", "node", "status", "attempt", "assigned", "ended", "took (chain s)",
                      "ran (node s)", "blocks", "output"], tasks, cls="tasks", empty="not assigned yet")
            + _audit_section(detail, audit, asked=audit_asked))
    return _layout(f"{wid} round {number}", body, watch=wid, partial=partial)


# ------------------------------------------------------------------------------ nodes


def _beat(node: Mapping) -> str:
    if node["heartbeat"] is None:
        return '<span class="unknown">unknown</span>'
    return '<span class="good">alive</span>' if node["heartbeat"] else '<span class="bad">silent</span>'


def _seconds(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.0f} s"


def _node_pending(node: Mapping) -> str:
    mine = node.get("pending") or {}
    if not mine.get("count"):
        return "–"
    return f'{e(mine["count"])} (oldest {_seconds(mine.get("oldest_seconds"))})'


STATUS_NOTES = {"PENDING": "queued in the validator",
                "UNKNOWN": "not known to the validator (a restarted validator forgets; the node sends it again)",
                None: "as the node's last heartbeat said (not confirmed)"}


def _pending_section(pending: Mapping | None) -> str:
    """Per node: how many batches it waits for, the oldest one's age, and their ids."""
    if pending is None:
        return ""
    parts = ['<h2>Pending batches</h2><p class="note">batches the live nodes submitted and wait for, from their '
             'heartbeats (the Sawtooth REST API lists none); each id checked with the REST API\'s /batch_statuses, '
             'so one that became final since the node\'s last beat is not counted</p>']
    if pending.get("error"):
        parts.append(f'<p class="bad" id="pending-error">{e(pending["error"])}</p>')
    rows = []
    for n in pending.get("nodes") or []:
        ids = "".join(
            f'<li data-batch="{e(b["id"])}"><code title="{e(b["id"])}">{e(b["id"][:16])}…</code> '
            f'<span class="sub" title="{e(STATUS_NOTES.get(b["status"], ""))}">{e(b["status"] or "unconfirmed")}, '
            f'{_seconds(b["seconds"])}</span></li>' for b in n["batches"])
        more = n["count"] - len(n["batches"])
        if more > 0:
            ids += f'<li class="sub">and {more} more</li>'
        rows.append(f'<tr data-node="{e(n["key"])}"><td>{_key(n)}</td><td class="count">{e(n["count"])}</td>'
                    f'<td>{_seconds(n.get("oldest_seconds"))}</td><td><ul class="batches">{ids}</ul></td></tr>')
    total = pending.get("total")
    parts.append(f'<p id="pending-total" data-total="{e(total)}">{e(total if total is not None else "unknown")} '
                 f'pending batch{"" if total == 1 else "es"} across the live nodes</p>')
    parts.append(_table(["node", "pending", "oldest waiting", "batches"], rows, cls="pending",
                        empty="no live node waits for a batch"))
    return "".join(parts)


def nodes_page(data: Mapping, chain: Mapping, *, partial: bool = False) -> str:
    compute = []
    for n in data["compute"]:
        resources = n.get("resources") or {}
        live = n.get("live_on_chain")
        seen = ("–" if n.get("seen_ago") is None else f'{n["seen_ago"]} s ago')
        load = n["load"]
        compute.append(
            f'<tr><td>{_key(n)}</td><td>{_beat(n)}</td>'
            f'<td class="{"good" if live else "bad" if live is False else ""}">'
            f'{"live" if live else "not live" if live is False else "–"} ({seen})</td>'
            f'<td>{e(resources.get("cpu_cores"))} cores, {e(resources.get("memory_mb"))} MB'
            f'{", " + e(resources["accelerator"]) if resources.get("accelerator") else ""}</td>'
            f'<td>{e(load["queue"])}</td><td>{e(load["done"])}</td><td>{e(load["missed"])}</td>'
            f'<td>{e(load["rejected"])}</td><td>{load["reliability"]:.3f}</td><td>{_num(n.get("restarts"))}</td>'
            f'<td>{_num(n.get("balance"))}</td><td class="pending">{_node_pending(n)}</td>'
            f'<td class="bad">{e(n.get("attack") or "")}</td></tr>')
    iot = []
    for n in data["iot"]:
        load = n["load"]
        iot.append(
            f'<tr><td>{_key(n)}</td><td>{_beat(n)}</td><td>{e(", ".join(n["workflows"])) or "–"}</td>'
            f'<td>{e(", ".join(n["coordinates"])) or "–"}</td><td>{e(n["submissions"])}</td>'
            f'<td>{e(load["queue"])}</td><td>{e(load["done"])}</td><td>{e(load["rejected"])}</td>'
            f'<td>{_num(n.get("restarts"))}</td><td>{_num(n.get("balance"))}</td>'
            f'<td class="pending">{_node_pending(n)}</td><td class="bad">{e(n.get("attack") or "")}</td></tr>')
    warning = f'<p class="bad">{e(data["heartbeat_error"])}</p>' if data.get("heartbeat_error") else ""
    pending = chain.get("pending_batches")
    observed = chain.get("observed") or {}
    chain_facts = _facts([
        ("head", f'block {e(chain["block"])} <code>{e(chain["head"])}</code>'),
        ("state root", f'<code>{e(chain["state_root"])}</code>'),
        ("chain time", f'{_time(chain.get("chain_time"))}'
                       + (f' ({chain["head_age"]:.0f} s ago)' if chain.get("head_age") is not None else "")),
        ("block rate", (f'{chain["blocks_per_minute"]:.1f} blocks/min over the last minute of chain time'
                        if chain.get("blocks_per_minute") is not None else "–")
                       + (f'; {observed["blocks_last_minute"]} blocks seen live in the last minute'
                          if observed.get("blocks_last_minute") is not None else "")),
        ("pending batches", (f'{e(pending)} (what the live nodes wait for, confirmed with the REST API)'
                             if pending is not None else "unknown: the nodes' heartbeats cannot be read")),
        ("event stream", "following the validator" if observed.get("following") else
         f'not connected{": " + e(observed["error"]) if observed.get("error") else " (waiting for the validator)"}'),
        ("endpoints", ", ".join(f"{e(k)} <code>{e(v)}</code>" for k, v in (chain.get("endpoints") or {}).items())),
    ])
    body = (_chain_strip(chain) + "<h1>Nodes</h1>" + warning
            + f'<h2>Compute nodes</h2><p class="note">live on chain: a heartbeat transaction within '
              f'{e(data["liveness_seconds"])} s of chain time (what reassignment trusts); heartbeat: a beat in Redis '
              f'within its time to live; reliability (done + 1) / (done + missed + 1) as the schedule ranks nodes</p>'
            + _table(["node", "heartbeat", "on chain", "resources", "queue", "done", "missed", "rejected",
                      "reliability", "restarts", "balance", "pending batches", "test attack"], compute, cls="compute",
                     empty="no compute node is registered")
            + "<h2>IoT nodes</h2>"
            + _table(["node", "heartbeat", "workflows", "coordinates", "submissions", "queue", "done", "rejected",
                      "restarts", "balance", "pending batches", "test attack"], iot, cls="iot",
                     empty="no workflow names an IoT node")
            + _pending_section(data.get("pending_batches"))
            + "<h2>Chain</h2>" + chain_facts)
    return _layout("Nodes", body, watch="nodes", partial=partial)


# ------------------------------------------------------------------------------ other


def error_page(status: int, message: str) -> str:
    body = f'<h1>{e(status)}</h1><p class="bad" id="error">{e(message)}</p><p><a href="/">all workflows</a></p>'
    return _layout(f"Error {status}", body, watch="", partial=False)


def login_page(target: str, *, error: str | None = None) -> str:
    problem = f'<p class="bad">{e(error)}</p>' if error else ""
    body = (f'<h1>Sign in</h1>{problem}<p>This dashboard asks for one of the read-only tokens in its token file.</p>'
            f'<form method="post" action="/login"><input type="hidden" name="next" value="{e(target)}">'
            f'<label>token <input type="password" name="token" autocomplete="current-password" required></label> '
            f'<button type="submit">Sign in</button></form>')
    return _layout("Sign in", body, watch="", partial=False)
