"""The test-only attack modes (fl/attacks.py): what each does to an update or to the labels,
deterministically, and the specs they refuse."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from trustmesh.fl.attacks import Attack, AttackError, parse_attack, parse_targeted

START = OrderedDict(w=torch.tensor([1.0, 2.0]))
LOCAL = OrderedDict(w=torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("spec, expected", [
    ("scale:100", [51.0, -98.0]),   # start + 100 * (local - start)
    ("scale", [51.0, -98.0]),       # 100 by default
    ("sign_flip", [0.5, 3.0]),      # start - (local - start)
    ("free_rider", [1.0, 2.0]),     # the global model unchanged
    ("label_flip", [1.5, 1.0]),     # the update as trained (its data was poisoned instead)
])
def test_each_mode_poisons_the_update_as_documented(spec, expected):
    assert parse_attack(spec).poison_update(START, LOCAL, seed=1)["w"].tolist() == expected


def test_noise_is_seeded_and_labels_flip():
    noise = parse_attack("noise:0.5")
    a, b = (noise.poison_update(START, LOCAL, seed=7)["w"] for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, LOCAL["w"])
    assert not torch.equal(a, noise.poison_update(START, LOCAL, seed=8)["w"])
    y = np.array([0, 3, 9], dtype=np.int64)
    assert parse_attack("label_flip").poison_labels(y, 10).tolist() == [9, 6, 0]
    assert parse_attack("scale:2").poison_labels(y, 10) is y


@pytest.mark.parametrize("spec, message", [
    ("boost", "the mode must be one of scale, sign_flip, noise, label_flip, free_rider"),
    ("sign_flip:2", "takes no parameter"),
    ("scale:lots", "'lots' is not a number"),
    ("noise:0", "must be a finite number > 0"),
    ("scale:inf", "must be a finite number"),
])
def test_bad_specs_say_what_would_do(spec, message):
    with pytest.raises(AttackError, match=message):
        parse_attack(spec)


def test_a_targeted_attack_names_its_data_owner():
    assert parse_targeted("02ab=scale:10") == ("02ab", Attack("scale", 10.0))
    with pytest.raises(AttackError, match="write OWNER=MODE"):
        parse_targeted("scale:10")


# --------------------------------------------------------------------------- never silent


def test_a_compute_node_in_attack_mode_says_so_in_its_heartbeat(tmp_path):
    import types

    from trustmesh.compute_node.node import ComputeNode

    honest = ComputeNode("compute-0", tmp_path / "a", validator_url="tcp://127.0.0.1:9", rest_url="http://127.0.0.1:9",
                         redis_url="redis://127.0.0.1:9")
    poisoning = ComputeNode("compute-1", tmp_path / "b", validator_url="tcp://127.0.0.1:9",
                            rest_url="http://127.0.0.1:9", redis_url="redis://127.0.0.1:9",
                            attacks={"02" + "ab" * 32: parse_attack("scale:100")})
    for node in (honest, poisoning):  # the REST client start() makes: only its pending batches are asked for
        node.rest = types.SimpleNamespace(pending_summary=lambda signer: {"count": 0, "batches": []})
    assert "attack" not in honest._status_info()
    assert poisoning._status_info()["attack"] == "scale:100 on 02ababababababab…"  # its key's first 16


def test_trustmesh_status_shows_attack_test_mode_for_a_node_that_said_so(tmp_path, capsys):
    """What the supervisor copied from a node's heartbeat into network.json, on its status line."""
    import json

    from trustmesh import cli
    from trustmesh.endpoints import NETWORK_FILE

    service = {"pid": None, "restarts": 0, "healthy": None}
    (tmp_path / NETWORK_FILE).write_text(json.dumps({"supervisor_pid": None, "endpoints": {}, "services": {
        "compute-0": service, "compute-1": {**service, "attack": "scale(100) on 02abababababababab…"}}}))
    cli.main(["--home", str(tmp_path), "status"])  # 1: the network is not running, which status says too
    lines = capsys.readouterr().out.splitlines()
    [honest] = [line for line in lines if "compute-0" in line]
    [poisoning] = [line for line in lines if "compute-1" in line]
    assert "ATTACK" not in honest
    assert poisoning.endswith("ATTACK TEST MODE: scale(100) on 02abababababababab…")


def test_iot_node_takes_an_attack_only_when_asked():
    from trustmesh import cli

    parser = cli.build_parser()
    assert parser.parse_args(["iot-node", "--name", "iot-1", "--data-dir", "d", "--attack", "sign_flip"]).attack == parse_attack("sign_flip")
    assert parser.parse_args(["iot-node", "--name", "iot-1", "--data-dir", "d"]).attack is None  # never on by default
    with pytest.raises(SystemExit):
        parser.parse_args(["iot-node", "--name", "iot-1", "--data-dir", "d", "--attack", "boost"])
