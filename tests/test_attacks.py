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
