"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium), and the everyday commands around a run: `workflow list / show`, `model export /
evaluate`, `logs`, `dashboard` access rules, and `up` starting the dashboard.

One federation serves the module: dev validator, the four families, Redis, a CouchDB-protocol
server, two compute nodes (which poison iot-5's updates x100, so the update checks reject them
by name) and five IoT nodes, 2 rounds. The browser opens the workflow's page before the IoT
nodes start and watches both rounds arrive without a reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers.dashboard import DashboardProcess, Lines, browser  # noqa: F401  (browser: a fixture)
from helpers.devnet_process import DevnetProcess
from helpers.family_scenario import _WORKFLOWS
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.federation_run import stores, until_every_round_is_final, until_history_is_recorded  # noqa: F401
from trustmesh import cli
from trustmesh.compute_node.node import ComputeNode
from trustmesh.fl import datasets, model_format
from trustmesh.fl.attacks import parse_attack
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader

ROUNDS = 2
WORKFLOW = "digits-dashboard"
NAMES = [f"iot-{i}" for i in range(1, 6)]
SCREENSHOTS = os.environ.get("TRUSTMESH_SCREENSHOTS")  # a folder: also save the pages as PNG there
RUN: dict = {}  # the module's federation, once it ran


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    node = DevnetProcess(tmp_path_factory.mktemp("dashboard-chain") / "devnet").start()
    yield node
    node.stop()


def _endpoint_flags(chain, stores) -> list[str]:  # noqa: F811
    redis_server, couch_server = stores
    return ["--rest", chain.rest_url, "--validator", chain.component_url, "--redis", redis_server.url,
            "--couch", couch_server.url]


@pytest.fixture(scope="module")
def dashboard(chain, stores, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("dashboard")
    process = DashboardProcess("--bind", "127.0.0.1:0", *_endpoint_flags(chain, stores), log=folder / "stderr.log",
                               env={"TRUSTMESH_HOME": str(folder / "home")})
    yield process
    assert process.stop() == 0, process.log_path.read_text()


# ------------------------------------------------------------------------------ the federation


def _definition(workflow_id: str, keys: dict[str, str], rounds: int, epochs: int = 1, **changes) -> dict:
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition.update(workflow_id=workflow_id, name="Federated digits, 5 IoT nodes, one poisoned",
                      description="Handwritten digits split across 5 IoT nodes (Dirichlet(0.5) label skew); "
                                  "the compute nodes poison iot-5's updates x100 (a test attack) and the "
                                  "update checks reject them", update_checks={"max_norm_ratio": 3.0})
    definition.update(changes)
    definition = {k: v for k, v in definition.items() if v is not None}  # a change of None leaves a field out
    definition["hyperparameters"]["epochs"] = epochs
    definition["federation"].update(participant_nodes=list(keys), coordinator_node="iot-1", expected_nodes=5,
                                    min_nodes_required=4, rounds=rounds, round_timeout=60)
    return workflow.resolve_node_names(definition, keys)


async def federate(chain, stores, folder: pathlib.Path, workflow_id: str, *, rounds: int = ROUNDS,  # noqa: F811
                   epochs: int = 1, attack: str | None = "scale:100", before_nodes=None, while_running=None,
                   **changes) -> dict:
    """Run the workflow to its end with iot-5's updates poisoned; before_nodes() runs once it is
    deployed, while_running() beside the rounds. Returns what the tests compare with."""
    redis_server, couch_server = stores
    keys = {n: load_or_create_key(folder / n / "keys", n).public_key().as_hex() for n in NAMES}
    attacker = keys["iot-5"]
    definition = _definition(workflow_id, keys, rounds, epochs, **changes)
    common = dict(validator_url=chain.component_url, rest_url=chain.rest_url, redis_url=redis_server.url)
    async with running_processor(chain.component_url, *federation_handlers()), rest(chain.rest_url) as client:
        # The chain's compute nodes keep their keys from run to run: one that registered stays live
        # on chain for 90 s after it stops, and would be given tasks that a new node beside it waits for.
        computes = [ComputeNode(f"compute-{i}", chain.data_dir.parent / f"compute-{i}", couch_url=couch_server.url,
                                attacks={attacker: parse_attack(attack)} if attack else {}, **common)
                    for i in (1, 2)]
        for node in computes:
            await node.start()
        iots = []
        try:
            owner = load_or_create_key(folder / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(
                owner, definition)])])
            assert status["status"] == "COMMITTED", status
            if before_nodes is not None:
                await before_nodes()
            iots = [IoTNode(n, folder / n, workflow_id=workflow_id, coordinator=(n == "iot-1"), **common)
                    for n in NAMES]
            for node in iots:
                await node.start()
            watcher = asyncio.ensure_future(while_running()) if while_running is not None else None
            await until_every_round_is_final(iots, rounds)
            await until_history_is_recorded(computes, rounds)
            if watcher is not None:
                await watcher
        finally:
            for node in iots + computes:
                await node.stop()
        reader = FederationReader(client)
        index = (await reader.rounds(workflow_id))["rounds"]
        results = [await reader.round_result(index[str(r)]) for r in range(1, rounds + 1)]
    return {"workflow_id": workflow_id, "definition": definition, "keys": keys, "attacker": attacker,
            "results": results, "schedule_ids": [index[str(r)] for r in range(1, rounds + 1)]}


@pytest.fixture(scope="module")
def finished(chain, stores, tmp_path_factory):  # noqa: F811
    """The module's finished federation: the browser test's, or one run here if it did not."""
    if not RUN:
        RUN.update(run(federate(chain, stores, tmp_path_factory.mktemp("federation"), WORKFLOW + "-b"),
                       timeout=240))
    return RUN


def accuracy_of(result: dict) -> float:
    return result["evaluations"]["evaluate"]["metrics"]["accuracy"]


# ------------------------------------------------------------------------------ the browser


def _points(browser, series: str = "accuracy") -> list[tuple[int, float]]:
    return [(int(r), float(v)) for r, v in browser.execute_script(
        "return Array.from(document.querySelectorAll('svg[data-chart=accuracy] circle.point[data-series=\"'"
        " + arguments[0] + '\"]')).map(c => [c.dataset.round, c.dataset.value]);", series)]


def _wait(predicate, timeout: float = 30, pause: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(pause)


def _screenshot(browser, name: str) -> None:
    if not SCREENSHOTS:
        return
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 16, 4000))
    browser.save_screenshot(str(pathlib.Path(SCREENSHOTS) / name))
    browser.set_window_size(1280, 1000)


def test_the_workflow_page_shows_each_round_as_it_arrives_with_the_accuracies_on_chain(
        chain, stores, dashboard, browser, tmp_path):  # noqa: F811
    page = dashboard.url + f"workflows/{WORKFLOW}"

    def opened() -> None:
        browser.get(page)
        _wait(lambda: browser.find_element("id", "live").text == "live", 15)  # the event stream is open
        assert "waiting for round 1" in browser.find_element("css selector", ".state").text
        assert _points(browser) == []
        browser.execute_script("window.__sameDocument = 'yes';")  # gone if the page reloads

    def arrived() -> None:
        # both rounds, each with its test accuracy, without a reload
        _wait(lambda: len(_points(browser)) == ROUNDS and "finished" in browser.find_element(
            "css selector", ".state").text, 60)

    started = time.monotonic()
    RUN.update(run(federate(chain, stores, tmp_path, WORKFLOW, before_nodes=lambda: asyncio.to_thread(opened),
                            while_running=lambda: asyncio.to_thread(arrived)), timeout=240))
    assert browser.execute_script("return window.__sameDocument;") == "yes", "the page was reloaded"
    assert browser.find_element("id", "content").get_attribute("data-refreshed"), "never updated in place"
    on_chain = [accuracy_of(r) for r in RUN["results"]]
    _wait(lambda: _points(browser) == list(zip(range(1, ROUNDS + 1), on_chain)), 10)
    assert len(browser.find_elements("css selector", "table.rounds tbody tr")) == ROUNDS
    rejected = browser.find_element("css selector", "table.rejected").text
    # named iot-5 once the dashboard has seen its heartbeat; by its short key before (names are best effort)
    shown_as = sum(line.count("iot-5") or line.count(RUN["attacker"][:16]) for line in rejected.splitlines())
    assert shown_as == ROUNDS and "max_norm_ratio" in rejected, rejected
    assert "2/2" in browser.find_element("css selector", ".rounds").text
    bars = browser.find_elements("css selector", "svg[data-chart=participation] rect.bar[data-kind=rejected]")
    assert [b.get_attribute("data-value") for b in bars] == ["1"] * ROUNDS
    _screenshot(browser, "dashboard-workflow.png")

    browser.get(dashboard.url)  # the list: state, rounds done / total, strategy, participants
    row = browser.find_element("css selector", f"tr[data-workflow='{WORKFLOW}']").text
    assert "finished" in row and "2/2" in row and "fedavg" in row
    print(f"browser: {ROUNDS} rounds watched live in {time.monotonic() - started:.1f} s")


def test_the_round_page_shows_the_record_the_tasks_and_the_audit(dashboard, browser, finished):
    workflow_id, number = finished["workflow_id"], ROUNDS
    browser.get(dashboard.url + f"workflows/{workflow_id}/rounds/{number}")
    text = browser.find_element("id", "content").text
    assert finished["schedule_ids"][-1] in text
    assert finished["results"][-1]["global_model_digest"] in text
    tasks = browser.find_elements("css selector", "table.tasks tbody tr")
    assert len(tasks) == 1 + 5 + 1 + 1  # preprocess, a local_train each, aggregate, evaluate
    assert all("done" in row.text for row in tasks)
    assert "max_norm_ratio" in browser.find_element("css selector", "table.participants").text
    browser.find_element("id", "run-audit").click()  # run on demand
    verdict = _wait(lambda: browser.find_elements("id", "audit-verdict"), 60)[0]
    assert verdict.get_attribute("data-ok") == "true", verdict.text
    _screenshot(browser, "dashboard-round.png")
    # cached by chain head: asked again at the same head, the same run answers
    status, first = dashboard.get(f"/api/workflows/{workflow_id}/audit?round={number}")
    status_again, again = dashboard.get(f"/api/workflows/{workflow_id}/audit?round={number}")
    assert status == status_again == 200 and first["round"]["ok"] is True
    if first["head"] == again["head"]:
        assert again["ran_at"] == first["ran_at"]


def test_the_nodes_page_and_the_json_api(dashboard, browser, finished):
    browser.get(dashboard.url + "nodes")
    compute = browser.find_element("css selector", "table.compute").text
    assert "compute-1" in compute and "compute-2" in compute
    iot = browser.find_element("css selector", "table.iot").text
    assert all(name in iot or finished["keys"][name][:16] in iot for name in NAMES)
    status, nodes = dashboard.get("/api/nodes")
    assert status == 200 and {n["name"] for n in nodes["compute"]} == {"compute-1", "compute-2"}
    loads = {n["key"]: n["load"] for n in nodes["iot"]}
    assert loads[finished["attacker"]]["rejected"] >= ROUNDS  # reputation: its rejected updates
    status, chain_view = dashboard.get("/api/chain")
    assert status == 200 and chain_view["block"] > 0 and chain_view["blocks_per_minute"] is not None
    # pending batches: what live nodes' heartbeats say they wait for (tests/test_pending_batches.py)
    assert isinstance(chain_view["pending_batches"], int) and nodes["pending_batches"]["error"] is None
    assert browser.find_elements("id", "pending-total") and "pending batches" in compute
    status, detail = dashboard.get(f"/api/workflows/{finished['workflow_id']}")
    assert status == 200 and [r["accuracy"] for r in detail["rounds"]] == [accuracy_of(r) for r in finished["results"]]
    assert all(len(r["rejected"]) == 1 and "max_norm_ratio" in next(iter(r["rejected"].values()))
               for r in detail["rounds"])
    status, missing = dashboard.get("/api/workflows/nope")
    assert status == 404 and "'nope' is not on chain" in missing["error"]
    status, page = dashboard.get("/workflows/nope/rounds/x")
    assert status == 400 and "a round is a whole number" in page and "Traceback" not in page


def test_off_loopback_the_dashboard_refuses_to_start_without_a_token_file(tmp_path):
    for bind in ("0.0.0.0:8080", "192.0.2.10:8080", "dashboard.example:8080", "[::]:8080"):
        result = subprocess.run([sys.executable, "-m", "trustmesh.cli", "dashboard", "--bind", bind],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (bind, result)
        assert "refusing to serve" in result.stderr and "--token-file" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    result = subprocess.run([sys.executable, "-m", "trustmesh.cli", "dashboard", "--bind", "127.0.0.1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--bind expects HOST:PORT" in result.stderr


def test_tokens_guard_every_api_route_and_the_pages(chain, stores, tmp_path, browser):  # noqa: F811
    token_file = tmp_path / "secrets" / "tokens"
    process = DashboardProcess("--bind", "127.0.0.1:0", "--token-file", str(token_file),
                               *_endpoint_flags(chain, stores), log=tmp_path / "dashboard.log")
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = [line for line in token_file.read_text().splitlines() if not line.startswith("#")][0]
        for path in ("/api/health", "/api/chain", "/api/workflows", "/api/nodes", "/api/events",
                     "/api/workflows/x", "/api/workflows/x/rounds/1", "/api/workflows/x/audit"):
            status, body = process.get(path)
            assert status == 401 and "bearer token" in body["error"], path
            status, _ = process.get(path, token=token[:-1] + ("A" if token[-1] != "A" else "B"))
            assert status == 401, path
        status, body = process.get("/api/workflows", token=token)
        assert status == 200 and "workflows" in body
        browser.delete_all_cookies()
        browser.get(process.url + "nodes")  # a browser signs in once; a cookie carries the token
        assert "/login" in browser.current_url
        browser.find_element("name", "token").send_keys("not-the-token-at-all")
        browser.find_element("css selector", "form button").click()
        _wait(lambda: "not in the dashboard's token file" in browser.page_source, 10)
        browser.find_element("name", "token").send_keys(token)
        browser.find_element("css selector", "form button").click()
        # the nodes page, whether or not an earlier test registered a compute node on this chain
        _wait(lambda: "<h2>Compute nodes</h2>" in browser.page_source, 10)
        assert browser.current_url.endswith("/nodes")
        _wait(lambda: browser.find_element("id", "live").text == "live", 10)  # the event stream too
    finally:
        assert process.stop() == 0
        browser.delete_all_cookies()
    token_file.chmod(0o644)  # readable by others: refused
    result = subprocess.run([sys.executable, "-m", "trustmesh.cli", "dashboard", "--bind", "0.0.0.0:0",
                             "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "chmod 600" in result.stderr, result.stderr


def test_a_rest_api_that_does_not_answer_is_one_line_and_the_pages_say_so(tmp_path):
    from trustmesh.stores.servers import free_port

    dead = free_port()
    process = DashboardProcess("--bind", "127.0.0.1:0", "--rest", f"http://127.0.0.1:{dead}", "--validator",
                               f"tcp://127.0.0.1:{free_port()}", "--redis", f"redis://127.0.0.1:{free_port()}/0",
                               log=tmp_path / "dashboard.log")
    try:
        status, body = process.get("/api/workflows")
        assert status == 503 and f"the REST API at http://127.0.0.1:{dead} does not answer" in body["error"]
        time.sleep(1.2)
        status, page = process.get("/")
        assert status == 503 and "does not answer" in page and "Traceback" not in page
        status, health = process.get("/api/health")
        assert status == 200 and health["ok"] is True
    finally:
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert log.count(f"waiting for the REST API at http://127.0.0.1:{dead}") == 1, log
    assert "Traceback" not in log


# ------------------------------------------------------------------------------ the commands


def trustmesh(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_workflow_list_and_show(chain, stores, finished, capsys, tmp_path):  # noqa: F811
    home = ["--home", str(tmp_path)]
    code, out, err = trustmesh(capsys, *home, "workflow", "list", "--rest", chain.rest_url)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith(finished["workflow_id"] + " "))
    assert "2/2" in line and "finished" in line and "fedavg" in line
    assert f"{accuracy_of(finished['results'][-1]):.4f}" in line
    code, out, err = trustmesh(capsys, *home, "workflow", "list", "--json", "--rest", chain.rest_url)
    rows = {w["workflow_id"]: w for w in json.loads(out)["workflows"]}
    assert rows[finished["workflow_id"]]["rounds_done"] == ROUNDS
    code, out, err = trustmesh(capsys, *home, "workflow", "show", finished["workflow_id"], "--rest", chain.rest_url)
    assert code == 0 and "version 1" in out and '"max_norm_ratio": 3.0' in out
    assert out.count("final") >= ROUNDS and f"round   {ROUNDS}" in out and "rejected 1" in out
    code, out, err = trustmesh(capsys, *home, "workflow", "show", finished["workflow_id"], "--json",
                               "--rest", chain.rest_url)
    shown = json.loads(out)
    assert shown["owner"] and shown["definition"]["workflow_id"] == finished["workflow_id"]
    assert [r["global_model"] for r in shown["rounds"]] == [r["global_model_digest"] for r in finished["results"]]
    code, out, err = trustmesh(capsys, *home, "workflow", "show", "no-such-workflow", "--rest", chain.rest_url)
    assert code == 2 and "'no-such-workflow' is not on chain" in err and finished["workflow_id"] in err


def test_model_export_writes_the_on_chain_model_and_evaluate_scores_it(chain, stores, finished, capsys,  # noqa: F811
                                                                       tmp_path):
    import torch

    flags = ["--home", str(tmp_path)]
    ends = _endpoint_flags(chain, stores)[:2] + _endpoint_flags(chain, stores)[4:]  # --rest, --redis, --couch
    wid, results = finished["workflow_id"], finished["results"]
    code, out, err = trustmesh(capsys, *flags, "model", "export", wid, "-o", str(tmp_path / "last.safetensors"),
                               *ends)
    assert code == 0, err
    blob = (tmp_path / "last.safetensors").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == results[-1]["global_model_digest"]  # the bytes on chain, as they are
    assert f"round {ROUNDS}" in out and "verified against the chain" in out
    code, out, err = trustmesh(capsys, *flags, "model", "export", wid, "--round", "1", "-o",
                               str(tmp_path / "first.pt"), *ends)
    assert code == 0, err
    state = torch.load(tmp_path / "first.pt", weights_only=True)
    expected = model_format.load(model_format.serialize(state, workflow_id=wid, round=1,
                                                        model_spec=finished["definition"]["model"]),
                                 results[0]["global_model_digest"], finished["definition"]["model"])
    assert list(state) == list(expected.state)
    # evaluated on the workflow's held-out split, the exported models score what the chain says
    test = datasets.held_out(finished["definition"]["data"])
    (tmp_path / "test.npz").write_bytes(datasets.dump_npz(test))
    for name, result in (("last.safetensors", results[-1]), ("first.pt", results[0])):
        code, out, err = trustmesh(capsys, "model", "evaluate", str(tmp_path / name), "--data",
                                   str(tmp_path / "test.npz"), "--json")
        assert code == 0, err
        assert json.loads(out)["accuracy"] == accuracy_of(result)
    code, out, err = trustmesh(capsys, "model", "evaluate", str(tmp_path / "last.safetensors"), "--data",
                               str(tmp_path / "test.npz"))
    assert f"accuracy {accuracy_of(results[-1]):.4f}" in out and f"workflow {wid}, round {ROUNDS}" in out


@pytest.mark.parametrize("args, message", [
    (["model", "export", "WF", "-o", "model.onnx"], "must end in .safetensors or .pt"),
    (["model", "export", "no-such-workflow", "-o", "m.pt"], "'no-such-workflow' is not on chain"),
    (["model", "export", "WF", "--round", "7", "-o", "m.pt"], "has no round 7 (rounds 1–2 have opened)"),
    (["model", "export", "WF", "-o", "missing-folder/m.pt"], "does not exist"),
    (["model", "evaluate", "missing.pt", "--data", "x.npz"], "cannot read missing.pt"),
    (["model", "evaluate", "model.bin", "--data", "x.npz"], "must end in .safetensors or .pt"),
])
def test_model_commands_refuse_bad_input_in_one_line(chain, stores, finished, capsys, tmp_path,  # noqa: F811
                                                     monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("WF", finished["workflow_id"]) for a in args]
    extra = _endpoint_flags(chain, stores)[:2] if args[1] == "export" else []
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), *args, *extra)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("m*.pt"))


def test_model_evaluate_refuses_files_that_are_not_what_they_claim(capsys, tmp_path, finished):
    (tmp_path / "data.npz").write_bytes(datasets.dump_npz(datasets.held_out(finished["definition"]["data"])))
    (tmp_path / "bad.pt").write_bytes(b"not a zip archive")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    for model, data, message in (("bad.pt", "data.npz", "is not a PyTorch state_dict file"),
                                 ("bad.safetensors", "data.npz", "not a safetensors file"),
                                 ("bad.pt", "nowhere.npz", "is not a PyTorch state_dict file")):
        code, out, err = trustmesh(capsys, "model", "evaluate", str(tmp_path / model), "--data", str(tmp_path / data))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_model_export_refuses_a_tampered_blob_and_writes_nothing(chain, stores, finished, capsys,  # noqa: F811
                                                                  tmp_path):
    import redis as redis_sync

    redis_server, couch_server = stores
    wid, digest = finished["workflow_id"], finished["results"][-1]["global_model_digest"]
    client = redis_sync.Redis.from_url(redis_server.url)
    original = client.get(f"blob_{digest}")
    tampered = bytearray(original)
    tampered[-1] ^= 0x01  # one bit of one weight
    ends = _endpoint_flags(chain, stores)[:2] + _endpoint_flags(chain, stores)[4:]
    try:
        client.set(f"blob_{digest}", bytes(tampered))
        # the CouchDB history still holds the right bytes: exported from there, Redis's copy refused
        code, out, err = trustmesh(capsys, "--home", str(tmp_path), "model", "export", wid, "-o",
                                   str(tmp_path / "ok.safetensors"), *ends)
        assert code == 0 and "read from CouchDB" in out, err
        assert "refused the copy in Redis" in err and "sha256" in err
        assert (tmp_path / "ok.safetensors").read_bytes() == original
        # without CouchDB, nothing matches the chain: refused, nothing written
        code, out, err = trustmesh(capsys, "--home", str(tmp_path), "model", "export", wid, "-o",
                                   str(tmp_path / "bad.safetensors"), *ends[:4])
        assert code == 2 and f"matches its on-chain digest {digest[:16]}" in err and "nothing written" in err, err
        assert "Traceback" not in err and not (tmp_path / "bad.safetensors").exists()
        assert not list(tmp_path.glob(".bad.safetensors*"))
    finally:
        client.set(f"blob_{digest}", original)
        client.close()


def test_logs_shows_and_follows_the_local_network_logs(tmp_path, capsys):
    logs = tmp_path / "logs"
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), "logs")
    assert code == 2 and "no local network logs" in err and "trustmesh up" in err
    logs.mkdir()
    (logs / "validator.log").write_text("".join(f"validator line {i}\n" for i in range(30)))
    (logs / "compute-1.log").write_text("compute says hello\n")
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), "logs")
    assert code == 0 and "compute-1 | compute says hello" in out and "validator | validator line 29" in out
    assert "validator line 9\n" not in out and "validator line 10" in out  # the last 20 of each
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), "logs", "validator", "-n", "2")
    assert out == "validator line 28\nvalidator line 29\n"
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), "logs", "iot-9")
    assert code == 2 and "no log named 'iot-9'" in err and "compute-1, validator" in err
    follower = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(tmp_path), "logs", "-f",
                                 "-n", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Until it shows a line it is not following yet (a loaded machine takes a while to start
        # it): a line written before then is not new to it.
        lines, pipe, probes = [], Lines(follower.stdout), 0
        deadline = time.monotonic() + 60
        while not any("validator | probe" in line for line in lines) and time.monotonic() < deadline:
            with open(logs / "validator.log", "a") as log:
                log.write(f"probe {probes}\n")
            probes += 1
            lines += pipe.read(0.3)
        assert any("validator | probe" in line for line in lines), "logs -f never showed a new line"
        with open(logs / "compute-1.log", "a") as log:
            log.write("a new line\n")
        (logs / "iot-1.log").write_text("a node that started later\n")
        wanted = {"compute-1 | a new line", "iot-1     | a node that started later"}
        lines = []
        deadline = time.monotonic() + 15
        while not wanted <= set(lines) and time.monotonic() < deadline:
            lines += pipe.read(0.2)
        assert "compute-1 | a new line" in lines and "iot-1     | a node that started later" in lines, lines
    finally:
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
    assert follower.returncode == 0 and b"Traceback" not in err


def test_up_starts_the_dashboard_and_down_stops_it(tmp_path):
    home = tmp_path / "net"

    def trustmesh_process(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=timeout)

    up = trustmesh_process("up", "--compute-nodes", "0", "--iot-nodes", "0", "--timeout", "90")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        network = json.loads((home / "network.json").read_text())
        url = network["endpoints"]["dashboard"]
        assert f"dashboard: {url}/" in up.stdout and network["services"]["dashboard"]["healthy"] is True
        with urllib.request.urlopen(url + "/api/chain", timeout=10) as response:
            assert json.loads(response.read())["block"] >= 0
        logs = trustmesh_process("logs", "dashboard")
        assert logs.returncode == 0 and "dashboard ready at" in logs.stdout
    finally:
        down = trustmesh_process("down")
    assert down.returncode == 0, down.stdout + down.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/api/health", timeout=5)


def test_a_differentially_private_workflow_shows_the_epsilon_spent_by_round(chain, stores, dashboard,  # noqa: F811
                                                                            browser, tmp_path, capsys):
    privacy = json.loads((_WORKFLOWS / "federated-digits-dp.json").read_text())["privacy"]
    privacy["epsilon_budget"] = 1000.0  # plenty for both rounds
    ran = run(federate(chain, stores, tmp_path, "digits-dp-dashboard", attack=None, description="with DP",
                       privacy=privacy, update_checks=None), timeout=240)
    spent = [r["privacy"]["epsilon"] for r in ran["results"]]
    assert spent[0] < spent[1]
    browser.get(dashboard.url + "workflows/digits-dp-dashboard")
    points = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg[data-chart=epsilon] circle.point')).map("
        "c => [Number(c.dataset.round), Number(c.dataset.value)]);")
    assert points == [[1, spent[0]], [2, spent[1]]]
    assert browser.find_element("css selector", "svg[data-chart=epsilon] line.guide").get_attribute(
        "data-value") == "1000.0"
    assert f"ε spent {spent[1]:.3f} of a budget of 1000.0" in browser.find_element("css selector", "dl.facts").text
    code, out, err = trustmesh(capsys, "--home", str(tmp_path), "workflow", "show", "digits-dp-dashboard",
                               "--rest", chain.rest_url)
    assert code == 0 and f"ε {spent[1]:.3f}" in out and "epsilon budget 1000.0" in out, out


def test_charts_draw_one_element_per_value_and_say_when_there_is_none():
    from trustmesh.dashboard import charts

    empty = charts.line_chart("accuracy", "accuracy", [charts.Series("accuracy", "test accuracy", charts.BLUE, [])],
                              rounds=12, y_label="accuracy", y_max=1.0)
    assert "no round has a value yet" in empty and "circle" not in empty
    one = charts.line_chart("loss", "loss", [charts.Series("loss", "loss", charts.RED, [(1, 0.25), (2, None)])],
                            rounds=3, y_label="loss", guide=("budget", 2.0))
    assert one.count('class="point"') == 1 and 'data-value="0.25"' in one and "polyline" not in one
    assert 'class="guide" data-value="2.0"' in one and "<script" not in one
    rounds = [{"number": 1, "expected": 5, "submitted": 5, "included": 4, "rejected": {"iot-5": "x"},
               "global_model": "ab" * 32, "phase": "final"},
              {"number": 2, "expected": 5, "submitted": 3, "included": 0, "rejected": {}, "global_model": None,
               "phase": "timeout"}]
    bars = charts.participation_chart(rounds, total=2)
    assert re.findall(r'data-kind="(\w[\w ]*)" data-round="(\d)" data-value="(\d)"', bars) == [
        ("included", "1", "4"), ("rejected", "1", "1"), ("timed out", "2", "3"), ("missing", "2", "2")]
    assert "round timed out" in bars
