"""Secure aggregation's pieces (fl/secagg.py), run as a whole round among simulated participants:
masks cancel exactly, participants that go quiet after uploading (one, two) and one that never
uploads are recovered from their neighbours' shares, fewer shares than the threshold stop the
round naming whose, and a wrong share is named with its sender or its holder."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from trustmesh.fl import secagg
from trustmesh.fl.strategies import ClientUpdate, FedAvg

SID = hashlib.sha256(b"round").hexdigest()


def _states(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    states = {}
    for i in range(n):
        states[f"node-{i:02d}"] = (OrderedDict(w=torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32),
                                               b=torch.tensor(rng.normal(size=3), dtype=torch.float32)),
                                   int(rng.integers(20, 400)))
    return states


class Round:
    """n participants of one round: keys, shares sealed for the neighbours, masked uploads."""

    def __init__(self, n: int, k: int, threshold: int, *, never_upload=()):
        self.states = _states(n)
        self.nodes = sorted(self.states)
        self.threshold = threshold
        self.secrets = {node: secagg.round_secrets(node.encode() * 4, SID) for node in self.nodes}
        self.c_publics = {node: secagg.public_key(s.c_private) for node, s in self.secrets.items()}
        self.s_publics = {node: secagg.public_key(s.s_private) for node, s in self.secrets.items()}
        self.graph = secagg.neighbours(SID, self.nodes, k)
        self.commitments = {node: secagg.commitment(s.self_seed) for node, s in self.secrets.items()}
        # every participant's shares of b and of s_sk, sealed per holder, digests published
        self.sealed, self.digests = {}, {}
        for node in self.nodes:
            for kind, secret in (("b", self.secrets[node].self_seed), ("s", self.secrets[node].s_private)):
                for holder, share in secagg.split_secret(secret, threshold, self.graph[node]).items():
                    key = secagg.agree(self.secrets[node].c_private, self.c_publics[holder], schedule_id=SID,
                                       a=node, b=holder, purpose="share")
                    self.sealed[kind, node, holder] = secagg.seal_share(key, share, schedule_id=SID, sender=node,
                                                                        holder=holder)
                    self.digests[kind, node, holder] = secagg.share_digest(share)
        self.uploaders = [node for node in self.nodes if node not in set(never_upload)]
        self.masked = {}
        for node in self.uploaders:
            state, samples = self.states[node]
            keys = secagg.pair_keys(self.secrets[node], node, self.s_publics, SID, self.graph[node])
            self.masked[node] = secagg.masked_input(state, samples, me=node, secrets=self.secrets[node], pair_keys=keys)

    def opened(self, kind: str, sender: str, holder: str) -> bytes:
        """What `holder` reads from the share `sender` sealed for it."""
        key = secagg.agree(self.secrets[holder].c_private, self.c_publics[sender], schedule_id=SID, a=sender,
                           b=holder, purpose="share")
        return secagg.open_share(key, self.sealed[kind, sender, holder], schedule_id=SID, sender=sender, holder=holder)

    def reveal(self, quiet=()):
        """Every holder still answering reveals, for each neighbour, its b share if that neighbour
        uploaded, else its s share; each checked against the sender's published digest."""
        revealed = {}
        for node in self.nodes:
            kind = "b" if node in self.masked else "s"
            for holder in self.graph[node]:
                if holder in quiet or holder not in self.masked:
                    continue
                share = self.opened(kind, node, holder)
                secagg.check_revealed(share, self.digests[kind, node, holder], sender=node, holder=holder)
                revealed.setdefault(node, {})[holder] = share
        return revealed

    def aggregate(self, revealed):
        seeds, dangling = secagg.recover(SID, self.graph, self.uploaders, self.threshold, revealed=revealed,
                                         self_commitments=self.commitments, s_publics=self.s_publics)
        total = secagg.unmask(self.masked, seeds, dangling)
        samples = sum(self.states[n][1] for n in self.uploaders)
        return total, secagg.dequantize(total, samples, self.states[self.nodes[0]][0])

    def fedavg(self):
        updates = [ClientUpdate(n, self.states[n][0], self.states[n][1]) for n in self.uploaders]
        return FedAvg().aggregate(updates)[0]


def _close(state, reference):
    for name in reference:
        scale = reference[name].abs().max().item()
        assert (state[name] - reference[name]).abs().max().item() <= 1e-4 * scale, name


def test_masks_cancel_exactly_and_the_sum_is_fedavgs():
    rnd = Round(10, k=4, threshold=3)
    total, state = rnd.aggregate(rnd.reveal())
    exact = sum((secagg.quantize(*rnd.states[n]) for n in rnd.nodes), np.zeros_like(total))
    assert np.array_equal(total, exact)  # bit for bit: every pair mask and self-mask came off
    _close(state, rnd.fedavg())


def test_a_masked_upload_alone_says_nothing_about_its_update():
    rnd = Round(5, k=4, threshold=3)
    node = rnd.nodes[0]
    plain = secagg.quantize(*rnd.states[node])
    y = rnd.masked[node]
    assert not np.array_equal(y, plain)
    # the self-mask gone (what revealed b shares allow), the pair masks still hide it
    assert not np.array_equal(y - secagg.prg(rnd.secrets[node].self_seed, y.size), plain)


@pytest.mark.parametrize("quiet", [1, 2])
def test_participants_that_go_quiet_after_uploading_are_recovered(quiet):
    rnd = Round(10, k=6, threshold=3)
    silent = rnd.nodes[:quiet]
    total, state = rnd.aggregate(rnd.reveal(quiet=silent))
    _close(state, rnd.fedavg())  # their updates are in, unmasked by their neighbours' shares


def test_a_participant_that_never_uploads_is_removed_with_its_masks():
    rnd = Round(10, k=4, threshold=3, never_upload=["node-03"])
    total, state = rnd.aggregate(rnd.reveal())
    assert "node-03" not in rnd.uploaders
    _close(state, rnd.fedavg())  # the mean of the nine, node-03's dangling pair masks taken off


def test_fewer_shares_than_the_threshold_stop_the_round_naming_whose():
    rnd = Round(6, k=2, threshold=2)
    victim = rnd.nodes[0]
    with pytest.raises(secagg.SecAggError, match=f"only 1 of the 2 shares needed to rebuild the self-mask of "
                                                 f"participant {victim[:16]}"):
        rnd.aggregate(rnd.reveal(quiet=rnd.graph[victim][:1]))


def test_a_wrong_share_is_named_with_its_holder_or_its_sender():
    rnd = Round(6, k=4, threshold=3)
    sender, holder = rnd.nodes[0], rnd.graph[rnd.nodes[0]][0]
    share = rnd.opened("b", sender, holder)
    forged = share[:1] + bytes(b ^ 1 for b in share[1:])
    with pytest.raises(secagg.SecAggError, match=f"node {holder[:16]}… revealed a share of {sender[:16]}"):
        secagg.check_revealed(forged, rnd.digests["b", sender, holder], sender=sender, holder=holder)
    # a sender whose shares do not rebuild what it committed to is named, not its holders
    revealed = rnd.reveal()
    revealed[sender] = {h: s[:1] + bytes(b ^ 1 for b in s[1:]) for h, s in revealed[sender].items()}
    with pytest.raises(secagg.SecAggError, match=f"participant {sender[:16]}…'s shares do not rebuild"):
        rnd.aggregate(revealed)


def test_a_share_opens_only_for_its_holder_in_its_round():
    rnd = Round(4, k=4, threshold=2)
    sender, holder, other = rnd.nodes[0], rnd.nodes[1], rnd.nodes[2]
    key = secagg.agree(rnd.secrets[other].c_private, rnd.c_publics[sender], schedule_id=SID, a=sender, b=other,
                       purpose="share")
    with pytest.raises(secagg.SecAggError, match="does not open"):
        secagg.open_share(key, rnd.sealed["b", sender, holder], schedule_id=SID, sender=sender, holder=holder)


def test_neighbours_are_symmetric_and_everybody_in_a_small_round():
    nodes = [f"n{i}" for i in range(9)]
    graph = secagg.neighbours(SID, nodes, 4)
    assert all(len(v) == 4 and all(node in graph[o] for o in v) for node, v in graph.items())
    assert secagg.neighbours(SID, nodes[:4], 4) == {n: sorted(set(nodes[:4]) - {n}) for n in nodes[:4]}
    with pytest.raises(secagg.SecAggError, match="even number"):
        secagg.neighbours(SID, nodes, 3)


def test_values_too_large_for_the_fixed_point_are_refused():
    with pytest.raises(secagg.SecAggError, match="too large"):
        secagg.quantize(OrderedDict(w=torch.tensor([1e30])), 10)
