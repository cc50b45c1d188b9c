"""Secure aggregation's pieces (fl/secagg.py), run as a whole round among simulated participants:
masks cancel exactly, participants that go quiet after uploading (one, two) and ones that never
upload (one, two) are recovered from their neighbours' shares, fewer shares than the threshold
or fewer uploads stop the round naming why, a wrong share is named with its sender or its
holder, revealed shares of one kind give away nothing sealed beside them, and the fixed point
leaves room for the largest sum."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from trustmesh.fl import secagg, secagg_block
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
        # every participant's shares of b and of s_sk, sealed per holder (as a node seals them),
        # digests published
        self.sealed, self.digests = {}, {}
        for node in self.nodes:
            sealed, digests = secagg.seal_shares(self.secrets[node], node, self.c_publics, SID, threshold,
                                                 self.graph[node])
            for holder in self.graph[node]:
                for kind in secagg.KINDS:
                    self.sealed[kind, node, holder] = sealed[holder][kind]
                    self.digests[kind, node, holder] = digests[holder][kind]
        self.uploaders = [node for node in self.nodes if node not in set(never_upload)]
        self.masked = {}
        for node in self.uploaders:
            state, samples = self.states[node]
            keys = secagg.pair_keys(self.secrets[node], node, self.s_publics, SID, self.graph[node])
            self.masked[node] = secagg.masked_input(state, samples, me=node, secrets=self.secrets[node], pair_keys=keys)

    def opened(self, kind: str, sender: str, holder: str) -> bytes:
        """What `holder` reads from the share `sender` sealed for it."""
        return secagg.open_share(self.secrets[holder].c_private, self.c_publics[sender], self.sealed[kind, sender, holder],
                                 schedule_id=SID, sender=sender, holder=holder, kind=kind)

    def reveal(self, quiet=()):
        """Every holder still answering reveals, for each neighbour, its b share if that neighbour
        uploaded, else its s share; each checked against the sender's published digest (the chain
        rule's check)."""
        revealed = {}
        for node in self.nodes:
            kind, what = ("b", "self-mask") if node in self.masked else ("s", "mask key")
            for holder in self.graph[node]:
                if holder in quiet or holder not in self.masked:
                    continue
                share = self.opened(kind, node, holder)
                assert secagg_block.wrong_share(share, self.digests[kind, node, holder], sender=node, holder=holder,
                                                what=what) is None
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


def test_two_neighbours_that_never_upload_are_removed_with_their_masks():
    graph = secagg.neighbours(SID, [f"node-{i:02d}" for i in range(10)], 6)
    first = "node-00"
    second = graph[first][0]  # its neighbour: an uploader beside both has two pairs' masks left over
    rnd = Round(10, k=6, threshold=3, never_upload=[first, second])
    total, state = rnd.aggregate(rnd.reveal())
    exact = sum((secagg.quantize(*rnd.states[n]) for n in rnd.uploaders), np.zeros_like(total))
    assert len(rnd.uploaders) == 8 and np.array_equal(total, exact)
    _close(state, rnd.fedavg())


def test_fewer_uploads_than_the_threshold_publish_no_sum():
    # five participants, everybody neighbours everybody, 3 shares needed; only two upload: their
    # shares suffice for nothing, and a sum of two would give each away to the other
    rnd = Round(5, k=4, threshold=3, never_upload=["node-02", "node-03", "node-04"])
    with pytest.raises(secagg.SecAggError, match="only 2 participant\\(s\\) uploaded a masked update, fewer than "
                                                 "the threshold 3"):
        rnd.aggregate(rnd.reveal())


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
    assert secagg_block.wrong_share(forged, rnd.digests["b", sender, holder], sender=sender, holder=holder,
                                    what="self-mask").startswith(f"node {holder} revealed a share of {sender}'s "
                                                                 f"self-mask that is not the one {sender} gave it")
    # a sender whose shares do not rebuild what it committed to is named, not its holders
    revealed = rnd.reveal()
    revealed[sender] = {h: s[:1] + bytes(b ^ 1 for b in s[1:]) for h, s in revealed[sender].items()}
    with pytest.raises(secagg.SecAggError, match=f"participant {sender[:16]}…'s shares do not rebuild"):
        rnd.aggregate(revealed)


def test_a_share_opens_only_for_its_holder_in_its_round():
    rnd = Round(4, k=4, threshold=2)
    sender, holder, other = rnd.nodes[0], rnd.nodes[1], rnd.nodes[2]
    with pytest.raises(secagg.SecAggError, match="does not open"):  # another node
        secagg.open_share(rnd.secrets[other].c_private, rnd.c_publics[sender], rnd.sealed["b", sender, holder],
                          schedule_id=SID, sender=sender, holder=holder, kind="b")
    with pytest.raises(secagg.SecAggError, match="does not open"):  # its holder, read as the other kind
        secagg.open_share(rnd.secrets[holder].c_private, rnd.c_publics[sender], rnd.sealed["b", sender, holder],
                          schedule_id=SID, sender=sender, holder=holder, kind="s")


def test_revealed_self_mask_shares_do_not_open_the_mask_key_shares_sealed_beside_them():
    """An outsider holds every sealed share (chain state) and, after the unmask step, the b shares
    in the clear (chain state): were both kinds sealed under one key and nonce, b_sealed XOR b is
    the keystream that opens s_sealed, and the victim's mask key, then its update, would follow."""
    rnd = Round(6, k=4, threshold=3)
    victim = rnd.nodes[0]
    guessed = {}
    for holder in rnd.graph[victim]:
        b_sealed, s_sealed = rnd.sealed["b", victim, holder], rnd.sealed["s", victim, holder]
        keystream = bytes(x ^ y for x, y in zip(b_sealed, rnd.opened("b", victim, holder)))
        guessed[holder] = bytes(x ^ y for x, y in zip(s_sealed, keystream))
        assert guessed[holder] != rnd.opened("s", victim, holder)
    try:
        rebuilt = secagg.combine_secret(guessed, rnd.threshold)
    except secagg.SecAggError:
        return  # not even shares
    assert secagg.public_key(rebuilt) != rnd.s_publics[victim]


def test_shares_sealed_again_after_a_restart_do_not_give_each_other_away():
    """A node that restarts before its shares are on chain splits anew and seals under the same
    keys (derived, not stored) and the fixed nonce: the two ciphertexts must not XOR to the two
    shares' XOR, as they would with a stream cipher's reused keystream."""
    rnd = Round(4, k=4, threshold=2)
    node, holder = rnd.nodes[0], rnd.nodes[1]
    again, _ = secagg.seal_shares(rnd.secrets[node], node, rnd.c_publics, SID, 2, rnd.graph[node])
    first, second = rnd.sealed["s", node, holder], again[holder]["s"]
    reopened = secagg.open_share(rnd.secrets[holder].c_private, rnd.c_publics[node], second, schedule_id=SID,
                                 sender=node, holder=holder, kind="s")
    plain_xor = bytes(x ^ y for x, y in zip(rnd.opened("s", node, holder), reopened))
    assert any(plain_xor)  # a fresh split: other shares
    assert bytes(x ^ y for x, y in zip(first, second))[:len(plain_xor)] != plain_xor


def test_every_sealed_share_has_a_key_of_its_own():
    mine, theirs = secagg.round_secrets(b"a" * 32, SID), secagg.round_secrets(b"b" * 32, SID)
    pub = secagg.public_key(theirs.c_private)
    keys = {secagg.share_key(mine.c_private, pub, schedule_id=sid, sender=a, holder=b, kind=kind)
            for sid in (SID, "other") for a, b in (("A", "B"), ("B", "A")) for kind in secagg.KINDS}
    assert len(keys) == 8  # per round, per direction, per kind


def test_a_malformed_share_is_named_by_its_holder():
    shares = secagg.split_secret(bytes(range(32)), 2, ["h1", "h2", "h3"])
    assert secagg.combine_secret({h: shares[h] for h in ("h1", "h3")}, 2) == bytes(range(32))
    with pytest.raises(secagg.SecAggError, match="the share revealed by h2… is malformed: 32 bytes"):
        secagg.combine_secret({"h1": shares["h1"], "h2": shares["h2"][:-1]}, 2)
    with pytest.raises(secagg.SecAggError, match="revealed by h1… and h2… both have index 1"):
        secagg.combine_secret({"h1": shares["h1"], "h2": shares["h1"]}, 2)


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
    largest = (secagg.LIMIT - 1) / 2.0 ** secagg.SCALE_BITS
    secagg.quantize(OrderedDict(w=torch.tensor([largest], dtype=torch.float64)), 1)
    with pytest.raises(secagg.SecAggError, match="too large"):
        secagg.quantize(OrderedDict(w=torch.tensor([2 * largest], dtype=torch.float64)), 1)


def test_the_sum_of_the_most_uploads_at_the_largest_values_does_not_wrap():
    from trustmesh.scheduling import definition

    assert max(definition.MAX_PARTICIPANTS, definition.MAX_GROUP_MEMBERS) <= secagg.MAX_SUMMED
    below = -(secagg.LIMIT - 1) / 2.0 ** secagg.SCALE_BITS  # the most negative a value may be
    state = OrderedDict(w=torch.tensor([below, -below], dtype=torch.float64))
    seeds = {f"n{i:05d}": hashlib.sha256(str(i).encode()).digest() for i in range(secagg.MAX_SUMMED)}
    masked = {n: secagg.masked_input(state, 1, me=n, secrets=secagg.RoundSecrets(b"", b"", seed), pair_keys={})
              for n, seed in seeds.items()}
    total = secagg.unmask(masked, seeds)
    assert total.view(np.int64).tolist() == [-(secagg.LIMIT - 1) * secagg.MAX_SUMMED, (secagg.LIMIT - 1) * secagg.MAX_SUMMED]
    with pytest.raises(secagg.SecAggError, match="at most"):
        secagg.unmask({**masked, "one-more": masked["n00000"]}, {**seeds, "one-more": seeds["n00000"]})
