"""intkey: Sawtooth's classic example family, on our runtime.

Used to exercise the ledger layer end to end (tests, benchmarks, the devnet smoke run): a name
maps to an integer; verbs set (create), inc and dec. Payloads are canonical CBOR maps
{"Verb", "Name", "Value"} and addresses follow the reference family (namespace + last 64 hex of
sha512(name)), so state written here reads the same as the reference intkey's.
"""

from __future__ import annotations

import hashlib

from . import payload as cbor
from .addressing import namespace
from .builders import make_transaction
from .processor import InvalidTransaction, TransactionHandler

FAMILY_NAME = "intkey"
FAMILY_VERSION = "1.0"
NAMESPACE = namespace(FAMILY_NAME)
MAX_NAME_LENGTH = 20
MAX_VALUE = 2**32 - 1
VERBS = ("set", "inc", "dec")


def address(name: str) -> str:
    return NAMESPACE + hashlib.sha512(name.encode()).hexdigest()[-64:]


def make_payload(verb: str, name: str, value: int) -> bytes:
    return cbor.encode({"Verb": verb, "Name": name, "Value": value})


def make_intkey_transaction(signer, verb: str, name: str, value: int, **kwargs):
    addr = address(name)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, make_payload(verb, name, value), [addr], [addr], **kwargs)


def _parse(data: bytes) -> tuple[str, str, int]:
    try:
        content = cbor.decode(data)
    except cbor.PayloadError as exc:
        raise InvalidTransaction(str(exc)) from None
    if not isinstance(content, dict) or set(content) != {"Verb", "Name", "Value"}:
        raise InvalidTransaction("intkey payload must be a map with exactly Verb, Name and Value")
    verb, name, value = content["Verb"], content["Name"], content["Value"]
    if verb not in VERBS:
        raise InvalidTransaction(f"Verb must be one of {', '.join(VERBS)}; got {verb!r}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise InvalidTransaction(f"Name must be a string of 1 to {MAX_NAME_LENGTH} characters")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VALUE:
        raise InvalidTransaction(f"Value must be an integer from 0 to {MAX_VALUE}")
    return verb, name, value


class IntkeyHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    def __init__(self, events: bool = True):
        """events: add an "intkey/changed" event per transaction (tests follow commits by it);
        without, the handler does exactly what the reference intkey does (get, then set)."""
        self.events = events

    async def apply(self, transaction, context) -> None:
        verb, name, value = _parse(transaction.payload)
        addr = address(name)
        stored = await context.get_state([addr])
        state = cbor.decode(stored[addr]) if addr in stored else {}
        current = state.get(name)
        if verb == "set":
            if current is not None:
                raise InvalidTransaction(f"{name!r} is already set (to {current}); use inc or dec")
            new = value
        else:
            if current is None:
                raise InvalidTransaction(f"{name!r} is not set; use set first")
            new = current + value if verb == "inc" else current - value
            if not 0 <= new <= MAX_VALUE:
                raise InvalidTransaction(f"{verb} {value} would take {name!r} to {new}, outside 0..{MAX_VALUE}")
        state[name] = new
        await context.set_state({addr: cbor.encode(state)})
        if self.events:
            await context.add_event("intkey/changed", [("name", name), ("value", str(new))])
