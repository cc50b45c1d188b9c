"""Which batches of a block must wait for which: the dict-based lookup the executor uses gives
exactly the answer of the plain rule (an earlier batch's output and a later batch's input
overlap when one is a prefix of the other)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.ledger.devnet.execution import _earlier_writers


def _overlaps(outputs, inputs) -> bool:
    return any(x.startswith(y) or y.startswith(x) for x in inputs for y in outputs)


def _pairwise(io):
    return [[j for j in range(i) if _overlaps(io[j][1], io[i][0])] for i in range(len(io))]


# Few distinct hex digits, so full addresses collide and prefixes of every length nest.
_address = st.builds(lambda head, length: (head * 70)[:length],
                     st.sampled_from(["a", "ab", "ba", "abc"]), st.sampled_from([0, 2, 6, 8, 69, 70]))
_batch = st.tuples(st.lists(_address, max_size=4), st.lists(_address, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(_batch, max_size=12))
def test_earlier_writers_equal_the_pairwise_rule(io):
    assert _earlier_writers(io) == _pairwise(io)


def test_full_addresses_and_prefixes_both_make_a_batch_wait():
    a = "ab" * 35
    io = [([], [a]), ([a[:6]], []), ([], [a[:8]]), ([a], []), (["cd" * 35], [])]
    assert _earlier_writers(io) == [[], [0], [], [0, 2], []]
