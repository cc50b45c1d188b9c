"""Where a command finds the network: its flags, then the environment, then the local network
that `trustmesh up` started (HOME/network.json) while it runs, then loopback defaults.

    TRUSTMESH_HOME       the local network's folder (default ./.trustmesh)
    TRUSTMESH_VALIDATOR  validator component endpoint   tcp://127.0.0.1:4004
    TRUSTMESH_REST       REST API                        http://127.0.0.1:8008
    TRUSTMESH_REDIS      Redis URL, password included    redis://127.0.0.1:6379/0
    COUCHDB_URL          CouchDB URL (optional)          (none)
    COUCHDB_USER / COUCHDB_PASSWORD  CouchDB credentials (optional)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from dataclasses import dataclass

DEFAULT_HOME = ".trustmesh"
NETWORK_FILE = "network.json"
DEFAULTS = {"validator": "tcp://127.0.0.1:4004", "rest": "http://127.0.0.1:8008",
            "redis": "redis://127.0.0.1:6379/0", "couch": None}
ENVIRONMENT = {"validator": "TRUSTMESH_VALIDATOR", "rest": "TRUSTMESH_REST", "redis": "TRUSTMESH_REDIS",
               "couch": "COUCHDB_URL"}


FIRST_CONTACT = 10.0  # seconds a command tries an endpoint that has never answered it


def command_rest_client(rest_url: str):
    """The REST client of a command (run, deploy, audit): waits out outages once it has reached
    the REST API, and gives up on one that never answered after FIRST_CONTACT seconds.
    BadRestURL if the URL is malformed."""
    import math

    from trustmesh.ledger.rest_client import RestClient  # aiohttp: only for commands that talk to the chain

    return RestClient(rest_url, patience=math.inf, first_contact=FIRST_CONTACT)


@dataclass(frozen=True)
class Endpoints:
    validator: str
    rest: str
    redis: str
    couch: str | None
    couch_user: str | None = None
    couch_password: str | None = None


def home_dir(value: str | os.PathLike | None = None) -> pathlib.Path:
    return pathlib.Path(value or os.environ.get("TRUSTMESH_HOME") or DEFAULT_HOME).absolute()


def local_network(home: str | os.PathLike | None = None) -> dict | None:
    """What `trustmesh up` wrote about the network it runs, or None when none was started there."""
    path = home_dir(home) / NETWORK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def pid_alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _running(network: dict | None) -> bool:
    """Whether the local network that wrote `network` still runs (its supervisor is alive): a
    stopped one's ports may belong to anything by now."""
    return pid_alive((network or {}).get("supervisor_pid"))


def resolve(home: str | os.PathLike | None = None, **flags: str | None) -> Endpoints:
    """Endpoints from flags (validator=, rest=, redis=, couch=), environment, the local network
    while it runs, defaults."""
    network = local_network(home)
    network = network.get("endpoints", {}) if _running(network) else {}
    chosen = {}
    for name, default in DEFAULTS.items():
        chosen[name] = flags.get(name) or os.environ.get(ENVIRONMENT[name]) or network.get(name) or default
    return Endpoints(**chosen, couch_user=os.environ.get("COUCHDB_USER") or None,
                     couch_password=os.environ.get("COUCHDB_PASSWORD") or None)


def add_endpoint_flags(parser: argparse.ArgumentParser, names=("validator", "rest", "redis", "couch")) -> None:
    """--validator / --rest / --redis / --couch, each optional; resolve() fills what is not given."""
    helps = {"validator": "validator component endpoint", "rest": "REST API URL",
             "redis": "Redis URL, password included if any", "couch": "CouchDB URL (credentials from "
             "COUCHDB_USER / COUCHDB_PASSWORD)"}
    for name in names:
        parser.add_argument(f"--{name}", default=None,
                            help=f"{helps[name]} (env {ENVIRONMENT[name]}; else the local network's; "
                                 f"else {DEFAULTS[name] or 'none'})")


def from_args(args: argparse.Namespace) -> Endpoints:
    return resolve(getattr(args, "home", None), **{name: getattr(args, name, None) for name in DEFAULTS})
