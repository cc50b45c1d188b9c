"""Checks of one value of a workflow definition, named by its path ("definition.federation.rounds").

The vocabulary the definition rules (definition_checks.py) are written in. Each check takes
the value and its path, returns the value when it is good and otherwise raises DefinitionError
saying which field breaks which rule. (Payload and stored-record fields, addressed as "payload field
'x'", are checked with common.check_fields / require / require_int / require_match instead.)

Integers must be integers (5, not 5.0; never booleans); NaN and infinities are refused.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PublicKey, SigningError

from .common import IDENTIFIER, PUBLIC_KEY, shown


class DefinitionError(InvalidTransaction):
    """A workflow definition that breaks a rule; the message names the field and what to do.

    An InvalidTransaction, so the processor lets it through as is; clients catch it by name.
    """


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "an integer", float: "a number", dict: "a map", list: "a list",
             bytes: "bytes", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def a_map(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise DefinitionError(f"{path} must be a map, got {type_name(value)}")
    return value


def fields(value: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A map with exactly the allowed string keys and every required one."""
    a_map(value, path)
    allowed = required + optional
    unknown = [k for k in value if k not in allowed]
    if unknown:
        listed = ", ".join(sorted(shown(k) for k in unknown))
        raise DefinitionError(f"{path} has unknown field(s) {listed}; allowed: {', '.join(allowed)}")
    for name in required:
        if name not in value:
            raise DefinitionError(f"{path} lacks the required field {name!r}")
    return value


def tagged(value: Any, path: str, tag: str, kinds: tuple[str, ...]) -> str:
    """A map whose field `tag` (model type, strategy name, partition kind) is one of `kinds`:
    that kind, which decides the map's other fields."""
    a_map(value, path)
    if tag not in value:
        raise DefinitionError(f"{path} lacks the required field {tag!r}")
    return choice(value[tag], f"{path}.{tag}", kinds)


def integer(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (write it without a fraction)" if isinstance(value, float) and math.isfinite(value) \
            and value == int(value) else ""
        raise DefinitionError(f"{path} must be an integer, got {type_name(value)}{hint}")
    if not low <= value <= high:
        raise DefinitionError(f"{path} must be between {low} and {high}; got {shown(value)}")
    return value


def number(value: Any, path: str, *, above: float | None = None, low: float | None = None,
           high: float | None = None, below: float | None = None) -> float:
    """A finite int or float; above/below are exclusive bounds, low/high inclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DefinitionError(f"{path} must be a number, got {type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DefinitionError(f"{path} must be a finite number; got {shown(value)} (NaN and infinities are refused)")
    if above is not None and not value > above:
        raise DefinitionError(f"{path} must be greater than {above}; got {shown(value)}")
    if low is not None and not value >= low:
        raise DefinitionError(f"{path} must be at least {low}; got {shown(value)}")
    if high is not None and not value <= high:
        raise DefinitionError(f"{path} must be at most {high}; got {shown(value)}")
    if below is not None and not value < below:
        raise DefinitionError(f"{path} must be less than {below}; got {shown(value)}")
    return value


def parameters(value: Any, path: str, bounds: Mapping, also: tuple[str, ...]) -> None:
    """A map of numeric parameters (name -> Number or Integer bounds, from the registry that owns
    them: fl/strategies, fl/privacy_block, fl/secagg_block, fl/screening). With `also` (fields the
    caller checks, such as a choice) every parameter is required, else each is optional."""
    required = (*also, *bounds) if also else ()
    fields(value, path, required, () if also else tuple(bounds))
    for name, bound in bounds.items():
        if name not in value:
            continue
        if bound.kind == "integer":
            integer(value[name], f"{path}.{name}", bound.low, bound.high)
        else:
            number(value[name], f"{path}.{name}", low=bound.low, high=bound.high)


def text(value: Any, path: str, max_length: int, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {type_name(value)}")
    if len(value) > max_length:
        raise DefinitionError(f"{path} is {len(value)} characters long; the limit is {max_length}")
    if not blank_ok and not value.strip():
        raise DefinitionError(f"{path} must not be empty or blank")
    return value


def choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DefinitionError(f"{path} must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def identifier(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {type_name(value)}")
    if not IDENTIFIER.match(value):
        raise DefinitionError(
            f"{path} must be an identifier (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or "
            f"digit); got {shown(value)}"
        )
    return value


def items(value: Any, path: str, low: int, high: int) -> list:
    if not isinstance(value, list):
        raise DefinitionError(f"{path} must be a list, got {type_name(value)}")
    if not low <= len(value) <= high:
        raise DefinitionError(f"{path} must hold between {low} and {high} items; it holds {len(value)}")
    return value


def node(value: Any, path: str, allow_names: bool) -> str:
    """A node: its compressed secp256k1 public key (a point on the curve), or with allow_names a
    node name that resolve_node_names turns into one before deploying."""
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {type_name(value)}")
    if PUBLIC_KEY.match(value):
        try:
            PublicKey.from_hex(value)
        except SigningError:
            raise DefinitionError(
                f"{path} is not a valid public key: {value} is not a point on secp256k1"
            ) from None
        return value
    if IDENTIFIER.match(value):
        if allow_names:
            return value
        raise DefinitionError(
            f"{path} is {value!r}, a node name: on chain a node is its compressed secp256k1 public "
            f"key (66 hex characters starting 02 or 03); resolve names to keys before deploying "
            f"(resolve_node_names, as `trustmesh workflow deploy` does)"
        )
    raise DefinitionError(
        f"{path} must be a compressed secp256k1 public key (66 lowercase hex characters starting "
        f"02 or 03){' or a node name' if allow_names else ''}; got {shown(value)}"
    )


def distinct_nodes(values: list, path: str, allow_names: bool, *, what: str = "participant") -> dict[str, int]:
    """Each of `values` a node (node()), none listed twice; node -> its index."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        node(value, f"{path}[{i}]", allow_names)
        if value in first:
            raise DefinitionError(f"{path} lists {value} twice (items {first[value]} and {i}); list each {what} once")
        first[value] = i
    return first
