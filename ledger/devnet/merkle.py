"""Sawtooth 1.2 Merkle-Radix global state tree, computed bit for bit like the real validator.

Layout: a 70-hex-char address is split into 35 two-char tokens; the root is at depth 0 and
each value sits in a leaf at depth 35. A node is the CBOR map {"c": {token: child_hash_hex},
"v": bytes or null}; its hash is the first 32 bytes of sha512(encoded node), as hex.

Two encodings meet here, exactly as in Sawtooth 1.2:
  * the validator's Python layer wraps every state value in CBOR (``cbor.dumps(value)``, a
    canonical byte string) before it reaches the tree, and unwraps it on the way out, so a
    leaf's "v" holds the *wrapped* value; this module does both, callers see plain bytes;
  * the Rust tree encodes nodes with cbor-codec 0.7.1, whose length header has a gap:
    lengths 0x10000..0xFFFFF are written with the 8-byte form (0x..1b) instead of the
    4-byte one. It only shows for state values of 64 KiB..1 MiB, and is reproduced here
    because those bytes feed the state root hash.

Nodes are immutable and content addressed, so this module keeps no storage of its own: it
reads nodes through ``read_node`` and ``update`` returns the new nodes for the caller to
persist (in the same transaction as the block that carries the new root).

Storage rows (hashes and roots are unaffected): in a sparse tree each leaf hangs under a
chain of ~30 one-child nodes, each fully determined by (token, child hash). ``storage_rows``
folds such chains into one row keyed by the chain's top node, and ``read_node`` may return
either a plain node or such a chain row. The rule that keeps every node findable: a root,
and a child of a node with other than one child, tops a row; a one-child node's child tops a
row or is in the same row as its parent.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Iterator, Mapping

import cbor2

try:
    # The same SHA-512, without OpenSSL's per-call context setup: most nodes hashed here are
    # 76 bytes, where that setup costs more than the hashing (~0.5 vs ~0.7 us a node).
    from _sha512 import sha512 as _sha512
except ImportError:  # an interpreter built without the builtin module
    _sha512 = hashlib.sha512

__all__ = [
    "EMPTY_ROOT",
    "AddressNotFound",
    "InvalidAddress",
    "InvalidNode",
    "MerkleRadix",
    "MissingStateNode",
    "UnknownStateRoot",
    "decode_node",
    "encode_node",
    "node_hash",
    "storage_rows",
]

ADDRESS_LENGTH = 70
TOKEN_SIZE = 2
DEPTH = ADDRESS_LENGTH // TOKEN_SIZE  # leaves live at depth 35

_ADDRESS_RE = re.compile(r"[0-9a-f]{70}")
_HEX_RE = re.compile(r"[0-9a-f]*")


class _MessageError:
    """KeyError's str() shows repr(args[0]); our errors should read as plain sentences."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownStateRoot(_MessageError, KeyError):
    """The state root hash is not in the node store."""


class MissingStateNode(_MessageError, KeyError):
    """A node below a known root is missing from the store (store damaged or half-written)."""


class AddressNotFound(_MessageError, KeyError):
    """A delete names an address that holds no value under the root (Sawtooth refuses it too)."""


class InvalidAddress(ValueError):
    """Not a 70-char lowercase hex state address."""


class InvalidNode(ValueError):
    """Stored bytes are not a Merkle node Sawtooth would accept."""


# --- encoding ---------------------------------------------------------------------------

def _head(major: int, n: int, *, shortest: bool = False) -> bytes:
    """CBOR major-type header as cbor-codec 0.7.1's ``type_len`` writes it (gap included), or,
    with shortest, in shortest form, as the Python ``cbor`` package writes the value wrapper."""
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return bytes((m | 25,)) + n.to_bytes(2, "big")
    # cbor-codec's match arms skip 0x10000..0xFFFFF, so those fall through to 8 bytes there.
    if n <= 0xFFFFFFFF and (shortest or n >= 0x100000):
        return bytes((m | 26,)) + n.to_bytes(4, "big")
    return bytes((m | 27,)) + n.to_bytes(8, "big")


def _text(s: str) -> bytes:
    b = s.encode()
    return _head(3, len(b)) + b


_C_KEY = b"\x61c"
_V_KEY_NULL = b"\x61v\xf6"
_V_KEY = b"\x61v"
_EMPTY_NODE = b"\xa2\x61c\xa0\x61v\xf6"


def encode_node(value: bytes | None, children: Mapping[str, str]) -> bytes:
    """Encode one node exactly as Sawtooth 1.2 stores it.

    ``value`` is the node's raw "v" (for a leaf: the CBOR-wrapped state value); children
    map a token to the child's hash hex. Keys come out in BTreeMap order ("c", "v"; tokens
    by their UTF-8 bytes), every length definite.
    """
    parts = [b"\xa2", _C_KEY, _head(5, len(children))]
    tokens = sorted(children)  # code point order == UTF-8 byte order == Rust String order
    if all(len(t) == 2 and len(children[t]) == 64 for t in tokens):
        # Usual shape: headers of a 2- and a 64-char text are "b" and "x@" in ASCII.
        body = "".join(["b" + t + "x@" + children[t] for t in tokens])
        if body.isascii():
            tokens = ()
            parts.append(body.encode())
    for token in tokens:
        parts.append(_text(token))
        parts.append(_text(children[token]))
    if value is None:
        parts.append(_V_KEY_NULL)
    else:
        value = bytes(value)
        parts.append(_V_KEY)
        parts.append(_head(2, len(value)))
        parts.append(value)
    return b"".join(parts)


_CHILD_ENTRIES_RE = re.compile(rb"(?:b[0-9a-f]{2}x@[0-9a-f]{64})*")
_ENTRY = 69  # b"b" + token + b"x@" + hash


def _decode_usual(data: bytes) -> tuple[bytes | None, dict[str, str]] | None:
    """Fast path for the layout encode_node writes (2-char tokens, 64-char hashes, "c"
    first); None when the bytes look any different, so the general decoder takes over."""
    if len(data) == 76 and data[:5] == b"\xa2\x61c\xa1\x62" and data[7:9] == b"\x78\x40" \
            and data[73:] == _V_KEY_NULL and data[5:73].isascii():
        return None, {data[5:7].decode(): data[9:73].decode()}  # one-child node: most of a tree
    if data[:3] != b"\xa2\x61c":
        return None
    n = data[3]
    if 0xA0 <= n < 0xB8:
        n, pos = n - 0xA0, 4
    elif n == 0xB8:
        n, pos = data[4], 5
    elif n == 0xB9:
        n, pos = int.from_bytes(data[4:6], "big"), 6
    else:
        return None
    end = pos + n * _ENTRY
    if data[end:end + 2] != b"\x61v" or not _CHILD_ENTRIES_RE.fullmatch(data, pos, end):
        return None
    s = data[pos:end].decode("ascii")
    children = {s[i + 1:i + 3]: s[i + 5:i + _ENTRY] for i in range(0, len(s), _ENTRY)}
    if len(children) != n:
        return None  # repeated token
    rest = data[end + 2:]
    if rest == b"\xf6":
        return None, children
    try:
        return _unwrap(rest), children
    except InvalidNode:  # not a definite byte string: the general decoder says why
        return None


def decode_node(data: bytes) -> tuple[bytes | None, dict[str, str]]:
    """Decode stored node bytes into (raw value, children); accepts what Sawtooth accepts
    (any key order, any length form, extra keys ignored)."""
    data = bytes(data)
    usual = _decode_usual(data)
    if usual is not None:
        return usual
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise InvalidNode(f"node is not valid CBOR: {exc}") from None
    if not isinstance(obj, dict) or "v" not in obj:
        raise InvalidNode("node is not a CBOR map with a 'v' entry")
    value = obj["v"]
    if value is not None and not isinstance(value, bytes):
        raise InvalidNode("node value is neither bytes nor null")
    children = obj.get("c", {})
    if not isinstance(children, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in children.items()
    ):
        raise InvalidNode("node children are not a text-to-text map")
    return value, children


def node_hash(encoded: bytes) -> str:
    return _sha512(encoded).digest()[:32].hex()


# --- storage rows -----------------------------------------------------------------------

# A chain row: this marker, k, the tokens t0..t(k-1) (2 ASCII bytes each), then the bottom
# node's bytes. Row key n0; n(i) = _one_child(t(i), hash(n(i+1))), nk = the bottom. A plain
# node is a CBOR map (first byte 0xa0..0xbf), so it never starts with the marker.
_CHAIN_ROW = b"\x00"
_ONE_CHILD_HEAD = b"\xa2\x61c\xa1\x62"  # then token, b"\x78\x40", child hash, _V_KEY_NULL
# A child entry as encode_node writes it. Found anywhere in a node, value bytes included: a
# superset of the children, which is all storage_rows needs.
_CHILD_HASH_RE = re.compile(r"x@([0-9a-f]{64})")


class NewNodes(dict):
    """What ``update`` returns: hash -> encoded node, plus the structure storage_rows needs,
    noted while the nodes are built. Parsing it back out of the bytes cost ~40% of
    storage_rows, for every block (in the state worker process, state_process.py)."""

    __slots__ = ("links", "pins", "decoded")

    def __init__(self):
        super().__init__()
        self.links: dict[str, str] = {}  # one-child node (as _one_child writes it) -> its child
        self.pins: set[str] = set()      # the children of every other node
        # The nodes above the points where the changes part ways, decoded, for
        # MerkleRadix.remember_new: the next block passes them on every read, and decoding
        # them again from the store costs ~1 us per child (they are the big ones).
        self.decoded: list[tuple[str, _Node]] = []


def _is_one_child(data: bytes) -> bool:
    """Exactly the bytes _one_child writes."""
    return (len(data) == 76 and data[:5] == _ONE_CHILD_HEAD and data[7:9] == b"\x78\x40"
            and data[73:] == _V_KEY_NULL)


def storage_rows(nodes: Mapping[str, bytes]) -> dict[str, bytes]:
    """Rows to store for a set of new nodes (hash -> bytes, as ``update`` returns them).

    A node is folded into its parent's row iff its only referrer among ``nodes`` is a
    one-child node; every other node tops a row of its own. A sparse tree's new address so
    takes ~1-3 rows instead of ~30. Callers insert rows whose key already exists as no-ops:
    the older row holds the same subtree, and keeps the rule on its own.
    """
    # This runs for every node of every block (in the state worker): bulk
    # operations and few Python steps per node.
    if isinstance(nodes, NewNodes):  # update() noted the structure as it built the nodes
        only_child, pinned = nodes.links, nodes.pins
    else:
        only_child = {h: data[9:73].decode() for h, data in nodes.items() if _is_one_child(data)}
        others = b"".join([nodes[h] for h in nodes.keys() - only_child.keys()]).decode("latin-1")
        pinned = _CHILD_HASH_RE.findall(others)  # a superset of their children: costs a row at most
    folded = {c for c, n in Counter(only_child.values()).items() if n == 1}
    folded.intersection_update(nodes)
    folded.difference_update(pinned)
    rows: dict[str, bytes] = {}
    child_of = only_child.get
    for h in nodes.keys() - folded:
        bottom, child = h, child_of(h)
        tokens = []
        while child in folded:
            tokens.append(nodes[bottom][5:7])
            bottom, child = child, child_of(child)
        if tokens:
            rows[h] = b"".join([_CHAIN_ROW, bytes((len(tokens),)), *tokens, nodes[bottom]])
        else:
            rows[h] = nodes[h]
    return rows


def _decode_row(key: str, data: bytes) -> list[tuple[str, _Node]]:
    """(hash, node) for every node of the row stored under ``key``, top first."""
    data = bytes(data)
    if data[:1] != _CHAIN_ROW:
        return [(key, decode_node(data))]
    end = 2 + 2 * data[1] if len(data) > 1 else 0
    tokens = data[2:end].decode("latin-1")
    if not 2 <= end <= len(data) or not _HEX_RE.fullmatch(tokens):
        raise InvalidNode(f"stored row {key} is a damaged chain row")
    bottom = data[end:]
    h = node_hash(bottom)
    nodes = [(h, decode_node(bottom))]
    for i in range(len(tokens) - TOKEN_SIZE, -1, -TOKEN_SIZE):
        token, child = tokens[i:i + TOKEN_SIZE], h
        h = node_hash(_one_child(token, child))
        nodes.append((h, (None, {token: child})))
    # The top's hash covers every node below it: a damaged row cannot pass for its key.
    if h != key:
        raise InvalidNode(f"stored row {key} does not hash to its key: the store is damaged")
    nodes.reverse()
    return nodes


def _wrap(value: bytes) -> bytes:
    """State value -> leaf "v": the CBOR byte string Sawtooth's Python layer stores."""
    return _head(2, len(value), shortest=True) + value


def _unwrap(stored: bytes) -> bytes:
    """Leaf "v" -> state value (inverse of _wrap; any definite length form accepted)."""
    if not stored or stored[0] >> 5 != 2:
        raise InvalidNode("leaf value is not a CBOR byte string")
    info = stored[0] & 0x1F
    if info < 24:
        start, length = 1, info
    elif info <= 27:
        start = 1 + (1 << (info - 24))
        length = int.from_bytes(stored[1:start], "big")
    else:
        raise InvalidNode("leaf value uses an indefinite-length byte string")
    if len(stored) != start + length:
        raise InvalidNode("leaf value length does not match its CBOR header")
    return stored[start:]


EMPTY_ROOT = node_hash(_EMPTY_NODE)
assert EMPTY_ROOT == "708ca7fbb701799bb387f2e50deaca402e8502abe229f705693d2d4f350e1ad6"


def _check_address(address: str) -> None:
    if not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address):
        raise InvalidAddress(f"state address must be 70 lowercase hex characters, got {address!r}")


def _check_hex_prefix(name: str, s: str) -> None:
    if not isinstance(s, str) or len(s) > ADDRESS_LENGTH or not _HEX_RE.fullmatch(s):
        raise InvalidAddress(f"{name} must be at most 70 lowercase hex characters, got {s!r}")


_DELETE = object()  # marks a delete in update()'s change list

_Node = tuple[bytes | None, dict[str, str]]  # (raw value, children), as decode_node returns


VALUE_CACHE_BYTES = 64 * 2**20  # values kept by (root, address): a few rounds' records at 1,000 participants
TAIL_CACHE_BYTES = 32 * 2**20  # single leaves kept by the node they hang under: ~200,000 small records
LINEAGE_BYTES = 32 * 2**20  # what blocks changed, kept by the root they made: hundreds of blocks' writes
LINEAGE_HOPS = 64  # parents a read looks through for a value kept at one of them
_UNKNOWN = object()


def _kept_size(value: bytes | None) -> int:
    return 200 + (len(value) if value is not None else 0)  # the key's two strings and the entry, roughly


def _changes_size(link: tuple[str, Mapping[str, bytes | None]]) -> int:
    return 200 + sum(100 + (len(v) if v is not None else 0) for v in link[1].values())


def _tail_size(tail: tuple[str, bytes]) -> int:
    return 250 + len(tail[0]) + len(tail[1])  # hash, suffix, value and the entry, roughly


class _Kept:
    """An LRU map bounded by the bytes its entries hold (size(value)); one entry larger than an
    eighth of the bound is not kept, since it would push out everything else. Safe to share
    between threads (REST reads and block building)."""

    def __init__(self, limit: int, size: Callable[[object], int]):
        self.entries: OrderedDict = OrderedDict()
        self.bytes, self.limit, self._size = 0, limit, size
        self._lock = threading.Lock()

    def get(self, key, default=None):
        return self.entries.get(key, default)

    def keep(self, items: Mapping) -> None:
        if not self.limit:
            return
        entries = self.entries
        with self._lock:
            for key, value in items.items():
                size = self._size(value)
                if size > self.limit // 8:
                    continue
                old = entries.pop(key, _UNKNOWN)
                if old is not _UNKNOWN:
                    self.bytes -= self._size(old)
                entries[key] = value
                self.bytes += size
            while self.bytes > self.limit:  # oldest out first
                _, value = entries.popitem(last=False)
                self.bytes -= self._size(value)


class _Walk:
    """One read or update under one root. The other nodes of a chain row wait in ``pending``
    until the walk reaches them, so it never relies on the shared cache keeping them."""

    __slots__ = ("root", "pending")

    def __init__(self, root: str):
        self.root = root
        # Popped on use: a walk seldom comes back to a node, and then finds it as any other.
        self.pending: dict[str, _Node] = {}


class MerkleRadix:
    """Read and update Merkle-Radix state trees stored as content-addressed nodes."""

    def __init__(self, read_node: Callable[[str], bytes | None], cache_size: int = 100_000,
                 value_cache_bytes: int = VALUE_CACHE_BYTES, tail_cache_bytes: int = TAIL_CACHE_BYTES):
        self._read_node = read_node
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Node] = OrderedDict()
        # (root, address) -> value (None: absent). A root's values never change, and one root is
        # read again and again: every batch of a block reads its inputs (the round's records) at
        # the parent's root, and REST readers ask for the head's. A hit skips the 35-node descent.
        self._values = _Kept(value_cache_bytes, _kept_size)
        # node hash -> (address suffix, wrapped value) of the one leaf below a node with no other:
        # a sparse tree hangs each leaf under a chain of ~15-30 one-child nodes, stored as one row
        # that must be read and hashed again at every listing (a round's 1,000 member records
        # took ~40 ms a listing). A node's hash fixes everything below it, so this never goes stale.
        self._tails = _Kept(tail_cache_bytes, _tail_size)
        # root -> (its parent root, {address: value or None} that made it from the parent), as
        # learn_child is told. A block changes a few records; its readers ask mostly for others
        # (the workflow, the round, the assignments), which then are the parent's, and those the
        # value cache above often holds: each block's new root used to send them all down the
        # tree again (at ten participants ~110 descents of ~35 nodes a round, ~8 now).
        self._lineage = _Kept(LINEAGE_BYTES, _changes_size)
        self._lock = threading.Lock()  # REST reads and block building may share one instance

    # --- node access -------------------------------------------------------------------

    def _load(self, walk: _Walk, h: str, path: str, remember: bool = True) -> _Node | None:
        """Node ``h``, reached from walk.root along ``path`` (its address prefix), or None if
        the store lacks it. ``remember``: keep what is read in the cache (a scan's deep nodes
        would only evict the hot ones)."""
        node = walk.pending.pop(h, None) or self._cached(h)
        if node is not None:
            return node
        nodes = self._read_row(h)
        if nodes is None and path:  # folded into the row of a node above, and evicted since
            nodes = self._reread(walk.root, path)
        if not nodes:
            return None
        decoded = dict(nodes)
        node = decoded.pop(h, None)
        walk.pending.update(decoded)
        if remember:
            self._remember(nodes)
        return node

    def _cached(self, h: str) -> _Node | None:
        cache = self._cache
        node = cache.get(h)
        if node is not None:
            try:
                cache.move_to_end(h)
            except KeyError:  # evicted meanwhile by another thread; the node is still good
                pass
        return node

    def _read_row(self, h: str) -> list[tuple[str, _Node]] | None:
        """The nodes of the row stored under ``h``, ``h``'s first; None if there is none."""
        if h == EMPTY_ROOT:
            return [(h, (None, {}))]  # known without a store, like Sawtooth's initialised db
        data = self._read_node(h)
        return None if data is None else _decode_row(h, data)

    def _reread(self, root: str, path: str) -> list[tuple[str, _Node]]:
        """The nodes of the rows from ``root`` down ``path``, read from the store alone: a node
        folded into its parent's row has no row of its own, so once its cached copy is gone
        only decoding the rows above it again finds it."""
        decoded: dict[str, _Node] = {}
        h = root
        for i in range(0, len(path) + 1, TOKEN_SIZE):
            if h not in decoded:
                nodes = self._read_row(h)
                if nodes is None:
                    break
                decoded.update(nodes)
            if i == len(path):
                break
            h = decoded[h][1].get(path[i:i + TOKEN_SIZE])
            if h is None:
                break
        return list(decoded.items())

    def _remember(self, nodes: list[tuple[str, _Node]]) -> None:
        cache = self._cache
        with self._lock:  # single-call OrderedDict ops are atomic; insert+evict is not
            for h, node in nodes:
                cache[h] = node
            while len(cache) > self._cache_size:
                cache.popitem(last=False)

    def _root(self, walk: _Walk) -> _Node:
        node = self._load(walk, walk.root, "")
        if node is None:
            raise UnknownStateRoot(f"state root {walk.root} is not in the node store")
        return node

    def _child(self, walk: _Walk, h: str, path: str, remember: bool = True) -> _Node:
        node = self._load(walk, h, path, remember)
        if node is None:
            raise MissingStateNode(f"node {h} under state root {walk.root} is missing from the store")
        return node

    # --- reads -------------------------------------------------------------------------

    def get(self, root: str, address: str) -> bytes | None:
        """The value at ``address`` under ``root``, or None if it holds none."""
        _check_address(address)
        known = self._values.get((root, address), _UNKNOWN)
        if known is not _UNKNOWN:
            return known
        value = self._inherited(root, address)
        if value is _UNKNOWN:
            value = self._descend(root, address)
        self._keep_values(root, {address: value})
        return value

    def learn_child(self, child: str, parent: str, sets: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        """``update(parent, sets, deletes)`` gave ``child``: its values are the parent's but these.
        A root fixes every value under it, so this never goes stale, whether or not the root is
        ever stored."""
        changes: dict[str, bytes | None] = {address: bytes(value) for address, value in sets.items()}
        changes.update(dict.fromkeys(deletes))  # set and deleted in one update: deleted (update's rule)
        self._lineage.keep({child: (parent, changes)})

    def _inherited(self, root: str, address: str):
        """The value at ``root`` as learned children tell it: the change that made a root, or a
        value kept for an ancestor no change since touched; _UNKNOWN if neither is at hand."""
        for _ in range(LINEAGE_HOPS):
            link = self._lineage.get(root)
            if link is None:
                return _UNKNOWN
            root, changes = link
            if address in changes:
                return changes[address]
            known = self._values.get((root, address), _UNKNOWN)
            if known is not _UNKNOWN:
                return known
        return _UNKNOWN

    def _descend(self, root: str, address: str) -> bytes | None:
        walk = _Walk(root)
        value, children = self._root(walk)
        for i in range(0, ADDRESS_LENGTH, TOKEN_SIZE):
            h = children.get(address[i:i + TOKEN_SIZE])
            if h is None:
                return None
            value, children = self._child(walk, h, address[:i + TOKEN_SIZE])
        return None if value is None else _unwrap(value)

    def get_many(self, root: str, addresses: Iterable[str]) -> dict[str, bytes]:
        """Values of the present addresses; one descent shared by addresses with common prefixes."""
        wanted = sorted(set(addresses))
        for a in wanted:
            _check_address(a)
        found: dict[str, bytes] = {}
        missing = []
        newly_known: dict[str, bytes | None] = {}  # at this root: inherited or read
        for a in wanted:
            known = self._values.get((root, a), _UNKNOWN)
            if known is _UNKNOWN:
                known = self._inherited(root, a)
                if known is _UNKNOWN:
                    missing.append(a)
                    continue
                newly_known[a] = known
            if known is not None:
                found[a] = known
        if missing:
            read: dict[str, bytes] = {}
            walk = _Walk(root)
            self._collect(walk, self._root(walk), 0, missing, 0, len(missing), read)
            newly_known.update((a, read.get(a)) for a in missing)
            found.update(read)
        if newly_known:
            self._keep_values(root, newly_known)
        return found

    def _keep_values(self, root: str, values: Mapping[str, bytes | None]) -> None:
        self._values.keep({(root, address): value for address, value in values.items()})

    def _collect(self, walk, node, depth, wanted, lo, hi, found) -> None:
        value, children = node
        if depth == DEPTH:
            if value is not None:
                found[wanted[lo]] = _unwrap(value)
            return
        at = depth * TOKEN_SIZE
        while lo < hi:
            token = wanted[lo][at:at + TOKEN_SIZE]
            end = lo + 1
            while end < hi and wanted[end][at:at + TOKEN_SIZE] == token:
                end += 1
            h = children.get(token)
            if h is not None:
                child = self._child(walk, h, wanted[lo][:at + TOKEN_SIZE])
                self._collect(walk, child, depth + 1, wanted, lo, end, found)
            lo = end

    def leaves(
        self, root: str, prefix: str = "", start: str | None = None, reverse: bool = False
    ) -> Iterator[tuple[str, bytes]]:
        """(address, value) pairs under ``root`` in address order (descending if ``reverse``),
        limited to addresses starting with ``prefix`` and, given ``start``, to addresses
        >= start (<= start when reversed). Lazy: nodes are read as the iterator advances."""
        _check_hex_prefix("prefix", prefix)
        if start is not None:
            _check_hex_prefix("start", start)
        walk = _Walk(root)
        node = self._root(walk)  # fail now, not at the first next()
        return self._iter_leaves(walk, node, prefix, start, reverse)

    def _iter_leaves(self, walk, node, prefix, start, reverse):
        # Walk down the whole tokens of the prefix; a trailing half token filters children.
        path = ""
        full = len(prefix) - len(prefix) % TOKEN_SIZE
        for i in range(0, full, TOKEN_SIZE):
            h = node[1].get(prefix[i:i + TOKEN_SIZE])
            if h is None:
                return
            path = prefix[:i + TOKEN_SIZE]
            node = self._child(walk, h, path)
        partial = prefix[full:]

        # Depth-first with an explicit stack of (path, node hash), next-to-visit on top.
        stack: list[tuple[str, str]] = []

        def push_children(base: str, children: dict[str, str], filt: str) -> None:
            tokens = sorted(children, reverse=not reverse)  # pushed so the first pops first
            for token in tokens:
                if filt and not token.startswith(filt):
                    continue
                p = base + token
                if start is not None:
                    s = start[:len(p)]
                    # Skip subtrees whose every address falls before start (after, reversed).
                    if (p > s) if reverse else (p < s):
                        continue
                stack.append((p, children[token]))

        value, children = node
        if value is not None:
            if self._in_range(path, start, reverse):
                yield path, _unwrap(value)
            return
        push_children(path, children, partial)
        tails = self._tails
        while stack:
            p, h = stack.pop()
            tail = tails.get(h)
            if tail is not None:
                address, value = p + tail[0], tail[1]
            else:
                top, top_path = h, p
                # A scan touches every node once; caching them would only evict the hot ones.
                value, children = self._child(walk, h, p, remember=len(p) <= 4)
                while value is None and len(children) == 1:  # a chain of one-child nodes: follow it
                    [(token, h)] = children.items()
                    p += token
                    value, children = self._child(walk, h, p, remember=False)
                if value is None:
                    if len(p) > 4:  # a node with several children: far fewer of them than of leaves
                        self._remember([(h, (value, children))])
                    push_children(p, children, "")
                    continue
                address = p
                tails.keep({top: (p[len(top_path):], value)})
            # like Sawtooth: a node with a value is a leaf
            if self._in_range(address, start, reverse):
                yield address, _unwrap(value)

    @staticmethod
    def _in_range(address: str, start: str | None, reverse: bool) -> bool:
        if start is None:
            return True
        return address <= start if reverse else address >= start

    # --- update ------------------------------------------------------------------------

    def update(
        self, root: str, sets: Mapping[str, bytes], deletes: Iterable[str] = ()
    ) -> tuple[str, dict[str, bytes]]:
        """Apply sets and deletes to the tree at ``root``; pure (it only warms the cache).

        Returns (new_root, new_nodes) where new_nodes (a NewNodes) maps hash -> encoded node
        for every node this update created; the caller persists them. Matches Sawtooth 1.2
        (MerkleDatabase::update) including its edge cases:
          * deleting an address with no value raises AddressNotFound;
          * an address both set and deleted ends up deleted, but the nodes on its path are
            kept even if left empty (Sawtooth keeps nodes on any set path).
        """
        changes: dict[str, object] = {}
        for address, value in sets.items():
            _check_address(address)
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"value for {address} must be bytes, got {type(value).__name__}")
            changes[address] = _wrap(bytes(value))
        for address in deletes:
            _check_address(address)
            changes[address] = _DELETE
        walk = _Walk(root)
        base = self._root(walk)
        if not changes:
            return root, NewNodes()
        # Sorted so each subtree's changes are one contiguous run; each node is visited once.
        items = [(a, changes[a], a in sets) for a in sorted(changes)]
        new_nodes = NewNodes()
        new_root = self._apply(walk, base, 0, items, 0, len(items), new_nodes)
        return new_root, new_nodes

    def remember_new(self, new_nodes: Mapping[str, bytes]) -> None:
        """Cache the decoded upper nodes of an update's result, once the caller serves its
        nodes (update itself stays pure: an unsaved root stays unknown)."""
        if isinstance(new_nodes, NewNodes):
            self._remember(new_nodes.decoded)

    def _apply(self, walk, node, depth, items, lo, hi, new_nodes) -> str | None:
        """Rebuild the subtree ``node`` (None: no such branch yet) at ``depth`` with the
        changes items[lo:hi]; returns its new hash, or None if it is pruned away."""
        if hi - lo == 1:
            return self._apply_one(walk, node, depth, *items[lo], new_nodes)
        value, children = (None, {}) if node is None else (node[0], dict(node[1]))
        only_child = next(iter(children.items())) if len(children) == 1 else None
        at = depth * TOKEN_SIZE
        prefix = items[lo][0][:at]
        on_set_path = False
        while lo < hi:
            token = items[lo][0][at:at + TOKEN_SIZE]
            end = lo + 1
            while end < hi and items[end][0][at:at + TOKEN_SIZE] == token:
                end += 1
            on_set_path = on_set_path or any(items[i][2] for i in range(lo, end))
            child_h = children.get(token)
            child = None if child_h is None else self._child(walk, child_h, items[lo][0][:at + TOKEN_SIZE])
            new_child = self._apply(walk, child, depth + 1, items, lo, end, new_nodes)
            if new_child is None:
                children.pop(token, None)
            else:
                children[token] = new_child
            lo = end
        # Sawtooth prunes a node left without children unless some set's path runs through it.
        if depth > 0 and not children and not on_set_path:
            return None
        if only_child is not None and len(children) > 1 and children.get(only_child[0]) == only_child[1]:
            self._split_chain(walk, prefix, *only_child, new_nodes)
        h = self._store(encode_node(value, children), new_nodes, children)
        new_nodes.decoded.append((h, (value, children)))
        return h

    def _apply_one(self, walk, node, depth, address, change, from_set, new_nodes) -> str | None:
        """_apply for a single change: below the point where changes part ways (most of
        the 35 levels) a path is walked down and rebuilt up in a loop, not by recursion."""
        path = []  # (depth, token, node) for the existing nodes above the change
        d = depth
        while d < DEPTH and node is not None:
            token = address[d * TOKEN_SIZE:(d + 1) * TOKEN_SIZE]
            path.append((d, token, node))
            h = node[1].get(token)
            node = None if h is None else self._child(walk, h, address[:d * TOKEN_SIZE + TOKEN_SIZE])
            d += 1
        if change is _DELETE:
            if d < DEPTH or node is None or node[0] is None:
                raise AddressNotFound(f"cannot delete {address}: no value under state root {walk.root}")
            h = None
        elif d == DEPTH:
            h = self._store(encode_node(change, {}), new_nodes, {})
        else:
            h = self._new_branch(address, change, d, new_nodes)
        if node is None and path:  # a new branch beside the children of the last node on the path
            split_depth, _, (_, siblings) = path[-1]
            if len(siblings) == 1:
                (only_token, only_hash), = siblings.items()
                prefix = address[:split_depth * TOKEN_SIZE]
                self._split_chain(walk, prefix, only_token, only_hash, new_nodes)
        for d, token, (value, children) in reversed(path):
            alone = len(children) == (token in children)  # no children besides this path
            if h is None and alone and d > 0 and not from_set:
                continue  # left without children: pruned, like Sawtooth (h stays None)
            if alone and value is None:  # the usual case, encoded without building a dict
                h = self._store(_EMPTY_NODE, new_nodes, {}) if h is None else self._store_link(token, h, new_nodes)
                continue
            children = dict(children)
            if h is None:
                children.pop(token, None)
            else:
                children[token] = h
            h = self._store(encode_node(value, children), new_nodes, children)
            new_nodes.decoded.append((h, (value, children)))
        return h

    def _new_branch(self, address: str, wrapped: bytes, depth: int, new_nodes) -> str:
        """A fresh single-leaf chain from ``depth`` down (most new addresses in a sparse tree
        need ~30 such one-child nodes)."""
        h = self._store(encode_node(wrapped, {}), new_nodes, {})
        # _store_link inlined: this loop is most of the Merkle work of a block of new keys.
        links, tokens, sha512 = new_nodes.links, address.encode(), _sha512
        for at in range(TOKEN_SIZE * (DEPTH - 1), TOKEN_SIZE * depth - 1, -TOKEN_SIZE):
            encoded = _ONE_CHILD_HEAD + tokens[at:at + TOKEN_SIZE] + b"\x78\x40" + h.encode() + _V_KEY_NULL
            child, h = h, sha512(encoded).digest()[:32].hex()
            new_nodes[h] = encoded
            links[h] = child
        return h

    def _split_chain(self, walk, prefix: str, token: str, child: str, new_nodes) -> None:
        """The node at ``prefix``, whose only child was ``child`` (at ``token``), gets a sibling.

        A child of a many-child node must top a row of its own, but ``child`` may be folded
        into its parent's chain row; so it joins new_nodes with its one-child descendants down
        to the first other node, and storage_rows makes it a top. A node already in new_nodes
        was made by this update, whose own nodes keep the rule: the walk stops there."""
        h, path = child, prefix + token
        while h not in new_nodes:
            value, children = self._child(walk, h, path)
            if value is None and len(children) == 1:
                (token, child), = children.items()
                encoded = _one_child(token, child)
            else:
                encoded, child = encode_node(value, children), None
            # A copy rebuilt from the decoded node must be exact.
            if self._store(encoded, new_nodes, children) != h:
                raise InvalidNode(f"node {h} under state root {walk.root} is not canonically encoded")
            if child is None:
                return
            h, path = child, path + token

    @staticmethod
    def _store(encoded: bytes, new_nodes: NewNodes, children: Mapping[str, str]) -> str:
        """Any node (``children`` as encoded): into new_nodes, its structure noted."""
        h = node_hash(encoded)
        new_nodes[h] = encoded
        if _is_one_child(encoded):
            new_nodes.links[h] = encoded[9:73].decode()
        else:
            new_nodes.pins.update(children.values())
        return h

    @staticmethod
    def _store_link(token: str, child: str, new_nodes: NewNodes) -> str:
        """_store for _one_child(token, child), ``token`` from a checked address."""
        encoded = _one_child(token, child)
        h = node_hash(encoded)
        new_nodes[h] = encoded
        new_nodes.links[h] = child
        return h


def _one_child(token: str, child: str) -> bytes:
    """== encode_node(None, {token: child}) for a 2-char hex token and a 64-char hash."""
    return _ONE_CHILD_HEAD + token.encode() + b"\x78\x40" + child.encode() + _V_KEY_NULL
