"""Differential privacy pieces (fl/privacy.py): clipping, seeded noise, DP-FedAvg on either side,
adaptive clipping and the dp-accounting accountant."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from trustmesh.fl import privacy
from trustmesh.fl.privacy import PrivacyError

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
DELTA = 1e-5


def state(**arrays) -> OrderedDict:
    return OrderedDict((name, torch.tensor(values, dtype=torch.float32)) for name, values in arrays.items())


def zeros(**shapes) -> OrderedDict:
    return OrderedDict((name, torch.zeros(shape, dtype=torch.float32)) for name, shape in shapes.items())


def as_bytes(tensors) -> bytes:
    return b"".join(t.numpy().tobytes() for t in tensors.values())


# --------------------------------------------------------------------------- clipping

finite32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
parameter = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=12), elements=finite32)


@settings(max_examples=300, deadline=None)
@given(st.lists(parameter, min_size=1, max_size=3), st.floats(1e-3, 1e3))
def test_clipping_bounds_every_contribution(arrays, clipping_norm):
    delta = OrderedDict((f"p{i}", torch.from_numpy(a)) for i, a in enumerate(arrays))
    clipped, norm = privacy.clip(delta, clipping_norm)
    assert norm == privacy.l2_norm(delta)
    assert list(clipped) == list(delta)
    assert all(c.dtype == torch.float64 and c.shape == d.shape for c, d in zip(clipped.values(), delta.values()))
    after = privacy.l2_norm(clipped)
    assert after <= clipping_norm  # exactly, not within a tolerance
    if norm <= clipping_norm:
        assert all(torch.equal(c, d.to(torch.float64)) for c, d in zip(clipped.values(), delta.values()))
    else:  # scaled down to the bound, in the same direction
        assert after >= clipping_norm * (1 - 1e-12)
        factor = clipping_norm / norm
        for c, d in zip(clipped.values(), delta.values()):
            assert torch.allclose(c, d.to(torch.float64) * factor, rtol=1e-12, atol=0)


def test_clipping_is_the_same_bits_every_time_and_leaves_its_input_alone():
    delta = state(w=[[3.0, 4.0], [12.0, 0.5]], b=[1e-3, -7.0])
    before = as_bytes(delta)
    first, norm = privacy.clip(delta, 2.0)
    second, _ = privacy.clip(delta, 2.0)
    assert as_bytes(first) == as_bytes(second)
    assert as_bytes(delta) == before
    assert norm == math.sqrt(math.fsum(v * v for v in [3.0, 4.0, 12.0, 0.5, float(np.float32(1e-3)), 7.0]))


def test_one_outsized_update_moves_the_mean_by_at_most_its_share():
    start = zeros(w=(4, 3), b=(3,))
    honest = {f"n{i}": state(w=[[0.1 * i] * 3] * 4, b=[0.2, -0.1, 0.05]) for i in range(4)}
    poisoned = dict(honest, n3=state(w=[[1e6] * 3] * 4, b=[-1e6, 1e6, 3.0]))
    c, n = 0.5, 4

    def mean(locals_):
        return privacy.dp_fedavg(start, locals_, clipping_norm=c, noise_multiplier=0.0, seed=SEED, label="t").state

    moved = privacy.l2_norm(OrderedDict((k, mean(poisoned)[k] - mean(honest)[k]) for k in start))
    assert moved <= 2 * c / n * (1 + 1e-6)  # replacing one update moves the mean by <= 2C/n (float32 slack)


# --------------------------------------------------------------------------- noise


def test_noise_has_the_calibrated_scale():
    draws = privacy.noise({"w": (400, 250)}, 0.37, SEED, label="scale")["w"].numpy().ravel()
    assert draws.dtype == np.float64 and draws.size == 100_000
    # standard error of the sample std: 0.37 / sqrt(2 * 100000) ~ 0.0008 (0.22 %): 1 % is ~4.5 of them
    assert abs(draws.std() / 0.37 - 1) < 0.01
    assert abs(draws.mean()) < 0.01 * 0.37
    assert stats.kstest(draws, "norm", args=(0, 0.37)).pvalue > 0.01  # fixed seed: a fixed p-value


def test_server_noise_on_the_mean_is_z_times_c_over_n():
    n, c, z = 10, 2.0, 1.5
    clipped = {f"n{i}": OrderedDict(w=torch.zeros(200, 500, dtype=torch.float64)) for i in range(n)}
    mean, std = privacy.noisy_mean(clipped, c, z, SEED, label="server")
    assert std == (z * c) / n == privacy.server_noise_std(c, z, n)
    assert abs(mean["w"].numpy().std() / 0.3 - 1) < 0.01
    # the mean itself is taken before the noise: a constant delta shifts the noisy mean by exactly it
    shifted = {k: OrderedDict(w=v["w"] + 0.25) for k, v in clipped.items()}
    again, _ = privacy.noisy_mean(shifted, c, z, SEED, label="server")
    assert torch.allclose(again["w"] - mean["w"], torch.full_like(mean["w"], 0.25), rtol=0, atol=1e-15)


def test_client_side_noise_sums_to_the_server_side_scale():
    n, c, z = 10, 1.0, 2.0
    start = zeros(w=(100, 1000))
    sent = {}
    for i in range(n):  # every client trained nothing (delta 0): what it sends is start + its noise
        sent[f"n{i}"], norm = privacy.client_update(start, start, clipping_norm=c, noise_multiplier=z, clients=n,
                                                    seed=SEED, label=f"wf/1/client/n{i}")
        assert norm == 0.0
    assert privacy.client_noise_std(c, z, n) == (z * c) / math.sqrt(n)
    mean = privacy.uniform_mean(sent)["w"].numpy().astype(np.float64)
    assert abs(mean.std() / ((z * c) / n) - 1) < 0.01  # the same std as server_noise_std(c, z, n)


def test_same_seed_same_bits_and_every_use_draws_its_own_noise():
    shapes = {"a": (64, 32), "b": (64, 32)}
    one = privacy.noise(shapes, 1.0, SEED, label="wf/3/server")
    assert as_bytes(one) == as_bytes(privacy.noise(shapes, 1.0, SEED, label="wf/3/server"))
    others = [privacy.noise(shapes, 1.0, SEED, label="wf/4/server"),
              privacy.noise(shapes, 1.0, OTHER_SEED, label="wf/3/server")]
    for other in others:
        for name in shapes:
            assert not torch.equal(one[name], other[name])
            assert abs(np.corrcoef(one[name].ravel(), other[name].ravel())[0, 1]) < 0.1
    assert abs(np.corrcoef(one["a"].ravel(), one["b"].ravel())[0, 1]) < 0.1  # same shape, own stream
    # a parameter's noise depends on its name only, not on which others are in the map
    assert torch.equal(privacy.noise({"b": (64, 32)}, 1.0, SEED, label="wf/3/server")["b"], one["b"])
    # std scales one draw: the same stream at any std
    assert torch.equal(privacy.noise(shapes, 0.5, SEED, label="wf/3/server")["a"], one["a"] * 0.5)


# sha256 of the noise below as drawn by numpy 2.4.6's PCG64 + ziggurat: a numpy whose stream differs
# would make every recorded round fail its audit, so an upgrade that changes it must fail here first
GOLDEN = "80a855f574ae87d524465dbd88c14020a0a70c61ea827463acbf82af6d57dc3c"
GOLDEN_CODE = """
import hashlib, sys
from trustmesh.fl import privacy
n = privacy.noise({"layer.weight": (3, 5), "layer.bias": (5,)}, 0.25, bytes(range(32)), label="wf/1/server")
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in n.values())).hexdigest())
"""


def test_a_fresh_process_draws_the_same_bits():
    here = {"layer.weight": (3, 5), "layer.bias": (5,)}
    digest = hashlib.sha256(as_bytes(privacy.noise(here, 0.25, SEED, label="wf/1/server"))).hexdigest()
    done = subprocess.run([sys.executable, "-c", GOLDEN_CODE], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == digest == GOLDEN


def test_dp_fedavg_is_recomputable_from_the_seed_and_records_what_it_did():
    start = state(w=[[0.5, -0.5], [0.25, 0.0]], b=[0.1, 0.2])
    locals_ = {"b-node": state(w=[[1.5, -0.5], [0.25, 0.0]], b=[0.1, 0.2]),      # moved 1.0
               "a-node": state(w=[[0.5, 2.5], [4.25, 0.0]], b=[0.1, 0.2])}       # moved 5.0
    kwargs = dict(clipping_norm=2.0, noise_multiplier=1.0, label="wf/2/server")
    result = privacy.dp_fedavg(start, locals_, seed=SEED, **kwargs)
    assert result.norms == {"a-node": 5.0, "b-node": 1.0}
    assert result.noise_std == 1.0 * 2.0 / 2
    assert all(t.dtype == torch.float32 for t in result.state.values())
    again = privacy.dp_fedavg(start, dict(reversed(list(locals_.items()))), seed=SEED, **kwargs)  # arrival order
    assert as_bytes(again.state) == as_bytes(result.state)
    assert as_bytes(privacy.dp_fedavg(start, locals_, seed=OTHER_SEED, **kwargs).state) != as_bytes(result.state)
    # what an auditor recomputes by hand: clip, mean, noise, apply, one cast
    clipped = {n: privacy.clip(privacy.update_delta(s, start), 2.0)[0] for n, s in locals_.items()}
    mean, _ = privacy.noisy_mean(clipped, 2.0, 1.0, SEED, label="wf/2/server")
    assert as_bytes(privacy.apply_delta(start, mean)) == as_bytes(result.state)


def test_means_take_nodes_in_sorted_order_whatever_the_arrival_order():
    # float64 addition is not associative: 1e16 + 1 - 1e16 is 0 in that order, 1 in sorted order
    arrived = {"a": [1e16], "c": [1.0], "b": [-1e16]}
    deltas = {n: OrderedDict(w=torch.tensor(v, dtype=torch.float64)) for n, v in arrived.items()}
    mean, _ = privacy.noisy_mean(deltas, 1.0, 0.0, SEED, label="x")
    assert mean["w"].item() == 1.0 / 3
    states = {n: OrderedDict(w=torch.tensor(v, dtype=torch.float32)) for n, v in arrived.items()}
    assert privacy.uniform_mean(states)["w"].item() == np.float32(1.0 / 3)


def test_the_seed_commitment_is_its_sha256():
    seed = privacy.new_seed()
    assert len(seed) == privacy.SEED_BYTES and seed != privacy.new_seed()
    assert privacy.commitment(seed) == hashlib.sha256(seed).hexdigest()


# --------------------------------------------------------------------------- adaptive clipping


def test_the_clipping_norm_moves_towards_the_target_quantile():
    step = dict(target_quantile=0.5, learning_rate=0.2)
    assert privacy.next_clipping_norm(1.0, 0.5, **step) == 1.0
    assert privacy.next_clipping_norm(1.0, 0.9, **step) < 1.0   # most updates fit: shrink
    assert privacy.next_clipping_norm(1.0, 0.1, **step) > 1.0   # most are clipped: grow
    assert privacy.next_clipping_norm(2.0, 0.8, **step) == pytest.approx(2.0 * math.exp(-0.2 * 0.3), rel=1e-15)
    # the norms of 50 updates, and a norm that starts 20x too small: it settles near their median
    norms = {f"n{i:02d}": v for i, v in enumerate(np.random.default_rng(3).lognormal(0.0, 0.3, 50).tolist())}
    c = 0.05
    for rnd in range(150):
        b = privacy.unclipped_fraction(norms, c, 2.5, SEED, label=f"wf/{rnd}/clip-count")
        c = privacy.next_clipping_norm(c, b, **step)
    assert c == pytest.approx(float(np.median(list(norms.values()))), rel=0.15)


def test_the_unclipped_fraction_is_seeded_and_exact_without_noise():
    norms = {"a": 0.5, "b": 1.0, "c": 1.5, "d": 3.0}
    assert privacy.unclipped_fraction(norms, 1.0, 0.0, SEED, label="x") == 0.5  # <= counts as unclipped
    noisy = privacy.unclipped_fraction(norms, 1.0, 0.5, SEED, label="x")
    assert noisy == privacy.unclipped_fraction(list(norms.values()), 1.0, 0.5, SEED, label="x")
    draw = float(privacy.noise({"count": ()}, 1.0, SEED, label="x")["count"])
    assert noisy == (2 + 0.5 * draw) / 4
    assert noisy != privacy.unclipped_fraction(norms, 1.0, 0.5, SEED, label="y")


def test_adaptive_clipping_keeps_the_total_noise_multiplier():
    z, s = 1.0, 2.5  # count_std = n / 20 with 50 clients
    z_delta = privacy.adaptive_noise_multiplier(z, s)
    assert z_delta > z
    assert (z_delta ** -2 + (2 * s) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    with pytest.raises(PrivacyError, match="raise count_std"):
        privacy.adaptive_noise_multiplier(1.0, 0.5)  # n / 20 with 10 clients is too little noise


# --------------------------------------------------------------------------- accountant


def test_epsilon_matches_the_libraries_reference_values():
    # dp-accounting, dp_accounting/rdp/rdp_privacy_accountant_test.py (test_compute_epsilon_delta_gaussian):
    # noise multiplier 4.530877117 is "chosen to obtain exactly (1, 1e-6)-DP" for one full-batch step
    # (there with dense orders 1.000..99.999; the default orders give 1.0000003)
    assert privacy.epsilon(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-5)
    # Opacus, opacus/tests/accountants_test.py (test_rdp_accountant): q 0.04, sigma 1.5, 2250 steps,
    # delta 1e-5 -> 7.32911117143 with Opacus' orders; dp-accounting's give 7.32933
    assert privacy.epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.32911117143, rel=1e-4)
    # Opacus 1.6.0's RDPAccountant on the grid of bench/bench_accountant.py (run there, side by side)
    for (z, q, rounds), opacus_value in {(0.5, 1.0, 12): 55.6017, (1.0, 1.0, 12): 21.4449, (2.0, 1.0, 100): 35.0818,
                                         (1.0, 0.1, 12): 3.6189, (2.0, 0.1, 100): 2.5806}.items():
        assert privacy.epsilon(z, q, rounds, DELTA) == pytest.approx(opacus_value, rel=1e-3)


@pytest.mark.parametrize("z, rounds", [(0.5, 1), (1.0, 12), (2.0, 100)])
def test_epsilon_is_an_upper_bound_near_the_exact_gaussian_value(z, rounds):
    import dp_accounting

    # full participation: `rounds` Gaussian mechanisms compose to one with z / sqrt(rounds), whose exact
    # epsilon is the analytic Gaussian mechanism's (Balle & Wang 2018, dp_accounting.get_epsilon_gaussian)
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(rounds), DELTA)
    assert exact <= privacy.epsilon(z, 1.0, rounds, DELTA) <= exact * 1.1


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    by_rounds = [privacy.epsilon(1.0, 1.0, r, DELTA) for r in range(0, 30)]
    assert by_rounds[0] == 0.0
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_noise = [privacy.epsilon(z, 1.0, 12, DELTA) for z in (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    assert privacy.epsilon(1.0, 0.1, 12, DELTA) < privacy.epsilon(1.0, 1.0, 12, DELTA)  # sampling amplifies


@pytest.mark.parametrize("z, q", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.1)])
def test_rounds_within_is_the_last_round_inside_the_budget(z, q):
    for rounds in (1, 7, 12):
        budget = privacy.epsilon(z, q, rounds, DELTA)
        assert privacy.rounds_within(budget, z, q, DELTA) == rounds
        unit = 10.0 ** -privacy.EPSILON_DECIMALS  # budgets count to EPSILON_DECIMALS decimals
        assert privacy.rounds_within(round(budget, privacy.EPSILON_DECIMALS) - unit, z, q, DELTA) == rounds - 1
    assert privacy.rounds_within(privacy.epsilon(z, q, 1, DELTA) / 2, z, q, DELTA) == 0
    assert privacy.rounds_within(1e9, z, q, DELTA, max_rounds=40) == 40


def test_the_budget_comparison_does_not_depend_on_the_last_bits_of_epsilon():
    """Validators whose scipy builds give epsilon a few ulps apart (EPSILON_RTOL) must agree on
    a budget set to the epsilon a plan spends, as printed to EPSILON_DECIMALS decimals."""
    budget = round(privacy.epsilon(1.0, 1.0, 2, DELTA), privacy.EPSILON_DECIMALS)  # 7.08...: as printed
    for eps in (budget, math.nextafter(budget, math.inf), budget * (1 + privacy.EPSILON_RTOL),
                budget * (1 - privacy.EPSILON_RTOL), budget + 4e-7):
        assert privacy.within_budget(eps, budget), eps  # raw comparison: False for the ones above the budget
    assert not privacy.within_budget(budget + 6e-7, budget)  # a real overspend, past half a unit
    assert not privacy.within_budget(budget + 1e-6, budget)


def test_rounds_with_different_noise_compose_by_the_library():
    """A round that averaged fewer noised updates (a smaller multiplier) spends more; the same
    multiplier throughout is exactly epsilon()."""
    assert privacy.epsilon_of_rounds([1.0, 1.0, 1.0], 1.0, DELTA) == privacy.epsilon(1.0, 1.0, 3, DELTA)
    assert privacy.epsilon_of_rounds([], 1.0, DELTA) == 0.0
    reduced = privacy.epsilon_of_rounds([1.0, 1.0 * math.sqrt(3 / 5), 1.0], 1.0, DELTA)
    assert privacy.epsilon(1.0, 1.0, 3, DELTA) < reduced < privacy.epsilon(math.sqrt(3 / 5), 1.0, 3, DELTA)
    from dp_accounting import GaussianDpEvent, rdp

    accountant = rdp.RdpAccountant()
    for z in (1.0, 1.0 * math.sqrt(3 / 5), 1.0):
        accountant.compose(GaussianDpEvent(z))
    assert reduced == pytest.approx(accountant.get_epsilon(DELTA), rel=privacy.EPSILON_RTOL)


def test_recorded_epsilon_comparison_names_tampering():
    eps = privacy.epsilon(1.0, 1.0, 5, DELTA)
    assert privacy.same_epsilon(eps, privacy.epsilon(1.0, 1.0, 5, DELTA))
    assert not privacy.same_epsilon(eps * (1 - 1e-6), eps)
    assert not privacy.same_epsilon(privacy.epsilon(1.0, 1.0, 4, DELTA), eps)


def test_the_accountant_needs_no_torch():
    code = ("import json, sys; from trustmesh.fl import privacy; "
            "e = privacy.epsilon(1.0, 1.0, 12, 1e-5); r = privacy.rounds_within(30.0, 1.0, 1.0, 1e-5); "
            "c = privacy.next_clipping_norm(1.0, 0.7, target_quantile=0.5, learning_rate=0.2); "
            "print(json.dumps([e, r, c, 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    eps, rounds, _, torch_loaded = json.loads(done.stdout)
    assert eps == privacy.epsilon(1.0, 1.0, 12, DELTA) and rounds == privacy.rounds_within(30.0, 1.0, 1.0, DELTA)
    assert torch_loaded is False


# --------------------------------------------------------------------------- bad inputs

BAD = [
    (lambda: privacy.clip(state(w=[1.0]), 0.0), "clipping_norm must be a finite number > 0"),
    (lambda: privacy.clip(state(w=[1.0]), float("nan")), "clipping_norm must be a finite number"),
    (lambda: privacy.clip(state(w=[1.0]), True), "clipping_norm must be"),
    (lambda: privacy.clip(state(w=[float("inf")]), 1.0), "leave this update out"),
    (lambda: privacy.clip({}, 1.0), "non-empty map"),
    (lambda: privacy.clip({"w": torch.tensor([1], dtype=torch.int64)}, 1.0), "float32 or float64"),
    (lambda: privacy.noise({"w": (2,)}, 1.0, bytes(16), label="x"), "must be 32 bytes .*new_seed"),
    (lambda: privacy.noise({"w": (2,)}, 1.0, "seed", label="x"), "must be 32 bytes"),
    (lambda: privacy.noise({"w": (2,)}, 1.0, SEED, label=""), "non-empty string"),
    (lambda: privacy.noise({"w": (2,)}, 1.0, SEED, label="a\x00b"), "without NUL"),
    (lambda: privacy.noise({"w": (2,)}, -1.0, SEED, label="x"), "noise std must be a finite number >= 0"),
    (lambda: privacy.noise({"w": (-2,)}, 1.0, SEED, label="x"), "negative dimension"),
    (lambda: privacy.noise({"w": "ab"}, 1.0, SEED, label="x"), "sequence of integers"),
    (lambda: privacy.noisy_mean({}, 1.0, 1.0, SEED, label="x"), "at least one update"),
    (lambda: privacy.noisy_mean({"a": state(w=[1.0]), "b": state(w=[1.0, 2.0])}, 1.0, 1.0, SEED, label="x"),
     "has shape"),
    (lambda: privacy.update_delta(state(w=[1.0]), state(v=[1.0])), "not the same model"),
    (lambda: privacy.dp_fedavg(state(w=[1.0]), {}, clipping_norm=1.0, noise_multiplier=1.0, seed=SEED, label="x"),
     "at least one"),
    (lambda: privacy.client_noise_std(1.0, 1.0, 0), "number of clients must be an integer >= 1"),
    (lambda: privacy.unclipped_fraction([], 1.0, 1.0, SEED, label="x"), "at least one update"),
    (lambda: privacy.next_clipping_norm(1.0, 0.5, target_quantile=1.5, learning_rate=0.2), "target_quantile"),
    (lambda: privacy.next_clipping_norm(1.0, 0.5, target_quantile=0.5, learning_rate=-1), "learning_rate"),
    (lambda: privacy.epsilon(0.0, 1.0, 1, DELTA), "noise_multiplier .*epsilon is infinite"),
    (lambda: privacy.epsilon(1.0, 0.0, 1, DELTA), "sample_rate .*1.0 when every participant"),
    (lambda: privacy.epsilon(1.0, 1.5, 1, DELTA), "sample_rate must be a finite number > 0 and <= 1"),
    (lambda: privacy.epsilon(1.0, 1.0, 1, 0.0), "delta must be .*e.g. 1e-5"),
    (lambda: privacy.epsilon(1.0, 1.0, 1, 1.0), "delta must be below 1"),
    (lambda: privacy.epsilon(1.0, 1.0, -1, DELTA), "rounds must be an integer"),
    (lambda: privacy.epsilon(1.0, 1.0, 2.0, DELTA), "rounds must be an integer"),
    (lambda: privacy.epsilon(1.0, 1.0, True, DELTA), "rounds must be an integer"),
    (lambda: privacy.rounds_within(-1.0, 1.0, 1.0, DELTA), "epsilon_budget must be a finite number >= 0"),
    (lambda: privacy.commitment(b"short"), "must be 32 bytes"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_say_what_to_change(call, message):
    with pytest.raises(PrivacyError, match=message):
        call()
    assert issubclass(PrivacyError, ValueError)
