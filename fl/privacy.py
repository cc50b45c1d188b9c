"""Client-level differential privacy for federated averaging: clipping, seeded Gaussian noise,
adaptive clipping and the privacy accountant (the pieces DP-FedAvg is made of; issue 15).

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each update's delta from the global model it started from is clipped to L2 norm <= C over all
parameters, the clipped deltas are averaged with equal weights (sample counts would change the
sensitivity), and Gaussian noise of std z*C is added to their sum, i.e. z*C/n to their mean:

    server side   dp_fedavg(start, locals, ...)       the aggregator clips, averages, adds the noise
    client side   client_update(start, local, ...)    each of n clients clips and adds std z*C/sqrt(n)
                  uniform_mean(states)                 the aggregator averages what they sent;
                                                       the n noises sum to std z*C, as above

Noise is a function of (seed, label, parameter name) only: noise(shapes, std, seed, label=...)
derives one stream per parameter from sha256("trustmesh-dp-noise" NUL seed label NUL name) and
draws from numpy's Generator(PCG64) (numpy is pinned). So a seed committed on chain before the
updates exist (commitment(seed)) and revealed after the round lets the audit recompute the noisy
aggregate bit for bit, and nobody could pick the noise after seeing the updates. The label keeps
each use apart; use e.g. f"{workflow}/{round}/server", f"{workflow}/{round}/client/{node_key}",
f"{workflow}/{round}/clip-count".
Why numpy and not torch.Generator: torch's CPU normal_ picks a vectorised kernel by CPU feature
(normal_fill_AVX2 for float32, with its own polynomial log/sincos), so the same seed gives other
bits on another machine with the same torch build; numpy's ziggurat is one scalar C code path on
every machine (exp/log of the C library only in its rare wedge and tail draws; the images pin
the C library with numpy) and its PCG64 stream is fixed for a pinned numpy.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"):
after a round clipped at C_t, the noisy fraction of updates whose norm was <= C_t,
    b = (#{i : norm_i <= C_t} + N(0, count_std^2)) / n          unclipped_fraction(...)
moves the norm geometrically towards the target quantile gamma with learning rate eta,
    C_t+1 = C_t * exp(-eta * (b - gamma))                         next_clipping_norm(...)
Releasing b costs privacy too: to keep the total noise multiplier z that the accountant is
given, the updates get z_delta = (z^-2 - (2 count_std)^-2)^-1/2 (adaptive_noise_multiplier;
needs count_std > z/2; the paper suggests count_std = n/20).

Accountant: fl/privacy_accountant.py (dp-accounting's RDP accountant, without torch, so the
workflow rules and the audit can call it); its names are re-exported here.

Arithmetic, as in strategies/averaging.py: every elementwise step is one correctly rounded IEEE
operation in float64 (no fused multiply-add), norms use screening.squared_norm (math.fsum, exactly
rounded), nodes are taken in sorted order, and a float32 model is produced by one cast at the end.
Bad inputs raise PrivacyError (a ValueError) saying what to change.
"""

from __future__ import annotations

import decimal
import hashlib
import math
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

from .privacy_accountant import (EPSILON_DECIMALS, EPSILON_RTOL, MAX_ROUNDS, PrivacyError, _count,  # noqa: F401
                                 _number, epsilon, epsilon_of_rounds, rounds_within, same_epsilon, within_budget)
from .screening import flat, squared_norm

if TYPE_CHECKING:  # types only: torch stays out of callers that only account
    import torch

SEED_BYTES = 32                  # a noise seed: 32 random bytes (new_seed)
NOISE_DOMAIN = b"trustmesh-dp-noise"


class DPResult(NamedTuple):
    """What a server-side DP-FedAvg round produces."""

    state: OrderedDict          # the new global model: start + noisy mean of the clipped deltas, float32
    norms: dict[str, float]     # node -> L2 norm of its delta before clipping (for adaptive clipping, records)
    noise_std: float            # std of the noise added to each coordinate of the mean


# --------------------------------------------------------------------------- checks


def _check_seed(seed: Any) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise PrivacyError(f"a noise seed must be {SEED_BYTES} bytes (make one with new_seed()), got {got}")
    return bytes(seed)


def _check_label(label: Any, what: str = "label") -> str:
    if not isinstance(label, str) or not label or "\x00" in label:
        raise PrivacyError(f"the noise {what} must be a non-empty string without NUL characters, got {label!r}; "
                           "name the use, e.g. '<workflow>/<round>/server'")
    return label


def _check_state(state: Any, what: str) -> "OrderedDict[str, torch.Tensor]":
    import torch

    if not isinstance(state, Mapping) or not state:
        raise PrivacyError(f"{what} must be a non-empty map parameter name -> tensor")
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise PrivacyError(f"{what}: parameter names must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float32, torch.float64):
            raise PrivacyError(f"{what}: parameter {name} must be a float32 or float64 tensor")
        if not torch.isfinite(tensor).all():
            raise PrivacyError(f"{what}: parameter {name} holds NaN or infinite values; leave this update out "
                               "(fl/screening.py rejects such updates before aggregation)")
    return OrderedDict(state)


def _same_model(a: Mapping, b: Mapping, what_a: str, what_b: str) -> None:
    if list(a) != list(b):
        raise PrivacyError(f"{what_a} and {what_b} have different parameters; they are not the same model")
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise PrivacyError(f"parameter {name} has shape {list(a[name].shape)} in {what_a} but "
                               f"{list(b[name].shape)} in {what_b}")


# --------------------------------------------------------------------------- seeds


def _same_models(states: Any, what: str) -> tuple[list[str], dict]:
    """(sorted nodes, node -> checked state) of states that are all the same model."""
    if not isinstance(states, Mapping) or not states:
        raise PrivacyError(f"no {what}s to average; a round needs at least one update")
    nodes = sorted(states)
    checked = {node: _check_state(states[node], f"node {node}'s {what}") for node in nodes}
    for node in nodes[1:]:
        _same_model(checked[nodes[0]], checked[node], f"node {nodes[0]}'s {what}", f"node {node}'s {what}")
    return nodes, checked


def new_seed() -> bytes:
    """A fresh noise seed (32 bytes from the OS's CSPRNG); commit commitment(seed) before the updates."""
    return secrets.token_bytes(SEED_BYTES)


def commitment(seed: bytes) -> str:
    """sha256 hex of a seed: what goes on chain before the round, to be checked against the revealed seed."""
    return hashlib.sha256(_check_seed(seed)).hexdigest()


# --------------------------------------------------------------------------- clipping and noise


def update_delta(local_state: Mapping, start_state: Mapping) -> OrderedDict:
    """local - start for every parameter, float64 (one IEEE subtraction per element)."""
    import torch

    local = _check_state(local_state, "the local model")
    start = _check_state(start_state, "the global model the round started from")
    _same_model(local, start, "the local model", "the global model")
    return OrderedDict((name, torch.sub(local[name].to(torch.float64), start[name].to(torch.float64)))
                       for name in local)


def l2_norm(state: Mapping) -> float:
    """The L2 norm over every parameter of a state, correctly rounded (sqrt of an exact-rounded sum)."""
    return math.sqrt(squared_norm(flat(state)))


def clip(delta_state: Mapping, clipping_norm: float) -> tuple[OrderedDict, float]:
    """(the delta scaled so its L2 norm over all parameters is <= clipping_norm, float64; its norm
    before). A delta within the norm comes back unchanged; a longer one is multiplied by
    clipping_norm / norm, and if rounding leaves the result a hair above the norm, by the next
    smaller double until it is not: the bound holds exactly, for the same bits everywhere."""
    import torch

    bound = _number(clipping_norm, "clipping_norm", hint="pick one near the typical update norm")
    delta = _check_state(delta_state, "the update's delta")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise PrivacyError("the update's delta is too large to measure (its squared norm overflows float64); "
                           "reject this update")
    if norm <= bound:
        return OrderedDict((name, t.to(torch.float64, copy=True)) for name, t in delta.items()), norm
    factor = bound / norm
    while True:
        clipped = OrderedDict((name, torch.mul(t.to(torch.float64), factor)) for name, t in delta.items())
        if l2_norm(clipped) <= bound:
            return clipped, norm
        factor = math.nextafter(factor, 0.0)


def _generator(seed: bytes, label: str, name: str):
    import numpy as np

    if "\x00" in name:
        raise PrivacyError(f"parameter name {name!r} holds a NUL character; rename the parameter")
    digest = hashlib.sha256(NOISE_DOMAIN + b"\x00" + seed + label.encode() + b"\x00" + name.encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))


def noise(shapes: Mapping[str, Sequence[int]], std: float, seed: bytes, *, label: str) -> OrderedDict:
    """name -> float64 tensor of N(0, std^2) draws, one independent stream per (seed, label, name)
    (module docstring); std * standard normal, one IEEE multiply each. `shapes`: name -> shape
    (a state's `{n: t.shape}`); the same arguments give the same bits in any process."""
    import numpy as np
    import torch

    std = _number(std, "the noise std", low_open=False)
    seed, label = _check_seed(seed), _check_label(label)
    if not isinstance(shapes, Mapping) or not shapes:
        raise PrivacyError("shapes must be a non-empty map parameter name -> shape")
    out = OrderedDict()
    for name, shape in shapes.items():
        if not isinstance(name, str):
            raise PrivacyError(f"parameter names must be strings, got {name!r}")
        try:
            size = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise PrivacyError(f"the shape of {name} must be a sequence of integers, got {shape!r}") from None
        if any(d < 0 for d in size):
            raise PrivacyError(f"the shape of {name} has a negative dimension: {list(size)}")
        draws = _generator(seed, label, name).standard_normal(size, dtype=np.float64)
        out[name] = torch.from_numpy(np.asarray(np.multiply(draws, std)))  # asarray: shape () too
    return out


def shapes_of(state: Mapping) -> OrderedDict:
    """name -> shape of a state, what noise() takes."""
    return OrderedDict((name, tuple(t.shape)) for name, t in state.items())


def server_noise_std(clipping_norm: float, noise_multiplier: float, clients: int) -> float:
    """std per coordinate of the noise on the MEAN of `clients` clipped deltas: (z * C) / n."""
    z = _number(noise_multiplier, "noise_multiplier", low_open=False)
    c = _number(clipping_norm, "clipping_norm")
    return (z * c) / _count(clients, "the number of clients")


def client_noise_std(clipping_norm: float, noise_multiplier: float, clients: int) -> float:
    """std per coordinate each of `clients` clients adds to its clipped delta: (z * C) / sqrt(n),
    so the n noises sum to std z * C. Pass the smallest count the round may close with
    (min_nodes_required): with fewer senders than assumed the sum would carry less noise."""
    z = _number(noise_multiplier, "noise_multiplier", low_open=False)
    c = _number(clipping_norm, "clipping_norm")
    return (z * c) / math.sqrt(_count(clients, "the number of clients"))


def noisy_mean(clipped: Mapping[str, Mapping], clipping_norm: float, noise_multiplier: float, seed: bytes, *,
               label: str) -> tuple[OrderedDict, float]:
    """(uniform mean of the clipped deltas + N(0, ((z*C)/n)^2) per coordinate, float64; that std).
    clipped: node -> clipped delta (from clip()); the deltas are summed in sorted node order, one
    IEEE add per element each, divided by n once, and the noise added once."""
    import torch

    nodes, states = _same_models(clipped, "clipped delta")
    std = server_noise_std(clipping_norm, noise_multiplier, len(nodes))
    draws = noise(shapes_of(states[nodes[0]]), std, seed, label=label)
    mean = OrderedDict()
    for name in states[nodes[0]]:
        acc = torch.zeros(states[nodes[0]][name].shape, dtype=torch.float64)
        for node in nodes:
            acc = torch.add(acc, states[node][name].to(torch.float64))
        mean[name] = torch.add(torch.div(acc, float(len(nodes))), draws[name])
    return mean, std


def apply_delta(start_state: Mapping, delta: Mapping) -> OrderedDict:
    """start + delta per parameter in float64, cast to float32 once: the model a delta leads to."""
    import torch

    start = _check_state(start_state, "the global model")
    _same_model(start, delta, "the global model", "the delta")
    return OrderedDict((name, torch.add(start[name].to(torch.float64), delta[name].to(torch.float64))
                        .to(torch.float32)) for name in start)


def dp_fedavg(start_state: Mapping, local_states: Mapping[str, Mapping], *, clipping_norm: float,
              noise_multiplier: float, seed: bytes, label: str) -> DPResult:
    """Server-side DP-FedAvg: every node's delta from start_state clipped to clipping_norm, their
    uniform mean plus seeded noise (noisy_mean), applied to start_state. local_states: node -> the
    model it trained (float32). With adaptive clipping pass adaptive_noise_multiplier(z, count_std)."""
    if not isinstance(local_states, Mapping) or not local_states:
        raise PrivacyError("no updates to aggregate; a round needs at least one")
    clipped, norms = {}, {}
    for node in sorted(local_states):
        clipped[node], norms[node] = clip(update_delta(local_states[node], start_state), clipping_norm)
    mean, std = noisy_mean(clipped, clipping_norm, noise_multiplier, seed, label=label)
    return DPResult(apply_delta(start_state, mean), norms, std)


def client_update(start_state: Mapping, local_state: Mapping, *, clipping_norm: float, noise_multiplier: float,
                  clients: int, seed: bytes, label: str) -> tuple[OrderedDict, float]:
    """Client-side DP-FedAvg, on one participant: (start + clipped delta + N(0, client_noise_std^2),
    float32, what it submits; its delta's norm before clipping). Aggregate with uniform_mean."""
    import torch

    clipped, norm = clip(update_delta(local_state, start_state), clipping_norm)
    std = client_noise_std(clipping_norm, noise_multiplier, clients)
    draws = noise(shapes_of(clipped), std, seed, label=label)
    return apply_delta(start_state, OrderedDict((n, torch.add(t, draws[n])) for n, t in clipped.items())), norm


def uniform_mean(states: Mapping[str, Mapping]) -> OrderedDict:
    """Equal-weight mean of float32 states (sorted nodes, float64 adds, one division, one cast):
    how the aggregator combines client-side noised updates."""
    import torch

    nodes, checked = _same_models(states, "model")
    out = OrderedDict()
    for name in checked[nodes[0]]:
        acc = torch.zeros(checked[nodes[0]][name].shape, dtype=torch.float64)
        for node in nodes:
            acc = torch.add(acc, checked[node][name].to(torch.float64))
        out[name] = torch.div(acc, float(len(nodes))).to(torch.float32)
    return out


# --------------------------------------------------------------------------- adaptive clipping


def adaptive_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The noise multiplier the updates get under adaptive clipping so that, with the clipped-count
    noise count_std, the round is as private as noise multiplier z: (z^-2 - (2*count_std)^-2)^-1/2."""
    z = _number(noise_multiplier, "noise_multiplier")
    s = _number(count_std, "count_std")
    if z >= 2 * s:
        raise PrivacyError(f"count_std {s:g} is too small for noise_multiplier {z:g}: it must be above "
                           f"{z / 2:g} (noise_multiplier / 2); raise count_std (the paper suggests clients / 20, "
                           "more with few clients), lower noise_multiplier, or use fixed clipping")
    return (z ** -2 - (2 * s) ** -2) ** -0.5


def unclipped_fraction(norms: Mapping[str, float] | Sequence[float], clipping_norm: float, count_std: float,
                       seed: bytes, *, label: str) -> float:
    """The noisy fraction of updates whose norm was <= clipping_norm:
    (count + count_std * N(0,1)) / n, the draw from noise() with this seed and label."""
    values = list(norms.values()) if isinstance(norms, Mapping) else list(norms)
    if not values:
        raise PrivacyError("no update norms given; the fraction needs at least one update")
    for v in values:
        _number(v, "an update norm", low_open=False)
    c = _number(clipping_norm, "clipping_norm")
    s = _number(count_std, "count_std", low_open=False)
    count = sum(1 for v in values if v <= c)
    draw = float(noise({"count": ()}, 1.0, seed, label=label)["count"])
    return (count + s * draw) / len(values)


def next_clipping_norm(clipping_norm: float, unclipped_fraction: float, *, target_quantile: float,
                       learning_rate: float) -> float:
    """The geometric update C * exp(-learning_rate * (unclipped_fraction - target_quantile)),
    computed in decimal (correctly rounded exp, 50 digits) and rounded to the nearest double:
    the same bits on every machine, whatever its C math library."""
    c = _number(clipping_norm, "clipping_norm")
    b = _number(unclipped_fraction, "unclipped_fraction", low=-math.inf)
    q = _number(target_quantile, "target_quantile", low_open=False, high=1.0)
    eta = _number(learning_rate, "learning_rate", low_open=False)
    with decimal.localcontext(decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)):
        D = decimal.Decimal
        factor = (-D(eta) * (D(b) - D(q))).exp()
        new = float(D(c) * factor)
    if not (math.isfinite(new) and new > 0):
        raise PrivacyError(f"the clipping norm left the range of doubles ({new!r}); lower learning_rate")
    return new
