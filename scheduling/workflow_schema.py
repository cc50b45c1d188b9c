"""The client's side of the definition rules: strict JSON reading and the published JSON Schema.

`check_definition` is what a client runs before deploying: the JSON Schema
(scheduling/workflow.schema.json, draft 2020-12, with the strategy, privacy, secure-aggregation,
rewards and update-check definitions made from the registries in fl/), then every rule the processor
applies (definition.validate_definition). The processor runs only the latter (no jsonschema in
apply()).
"""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources
from typing import Any

from trustmesh.fl import privacy_block, rewards_block, screening, secagg_block
from trustmesh.fl import strategies as strategy_registry

from .common import shown
from .definition import ROOT, DefinitionError, validate_definition

SCHEMA_FILE = "workflow.schema.json"
IDENTIFIER_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # common.IDENTIFIER, as the schema writes it
_GENERIC_LAST = {"contains": 1, "not": 1}  # whole-list rules after the specific ones


# --------------------------------------------------------------------------- strict JSON


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; workflow numbers must be finite")


def parse_definition(text: str | bytes, *, source: str = "definition") -> dict:
    """Parse JSON text strictly: no NaN/Infinity, no duplicate keys. DefinitionError otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise DefinitionError(f"{source}: the key {exc.args[0]!r} appears twice in one object") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{source} is not valid JSON: {exc}") from None


def load_definition(path: str | os.PathLike) -> dict:
    """A workflow definition from a JSON file (parsed strictly; not yet validated)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as exc:
        raise DefinitionError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    return parse_definition(text, source=os.fspath(path))


# --------------------------------------------------------------------------- the JSON Schema


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The published JSON Schema (scheduling/workflow.schema.json) with its `strategy`
    definition made from the strategy registry (fl/strategies/), as `trustmesh workflow schema`
    prints it."""
    schema = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    schema["$defs"]["strategy"] = strategy_registry.schema_of_strategies()
    schema["$defs"]["privacy"] = privacy_block.schema()
    schema["$defs"]["secure_aggregation"] = secagg_block.schema()
    schema["$defs"]["rewards"] = rewards_block.schema()
    schema["$defs"]["update_checks"] = {
        "type": "object", "additionalProperties": False,
        "properties": {name: bounds.schema() for name, bounds in screening.PARAMETERS.items()}}
    return schema


@functools.lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema
    from jsonschema import validators

    base = jsonschema.Draft202012Validator
    # JSON integers are whole numbers written without a fraction, as the processor sees them in
    # CBOR (5.0 would arrive as a float); bool is never a number.
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )

    def pattern(validator, patrn, instance, schema):
        # ECMA-262 semantics, which JSON Schema specifies: "$" ends the string (Python's "$"
        # would also match before a final newline).
        if validator.is_type(instance, "string"):
            python = patrn[:-1] + r"\Z" if patrn.endswith("$") and not patrn.endswith(r"\$") else patrn
            if not re.search(python, instance):
                yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    cls = validators.extend(base, validators={"pattern": pattern}, type_checker=checker)
    schema = load_schema()
    base.check_schema(schema)
    return cls(schema)


def _json_path(parts) -> str:
    text = ROOT
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _schema_message(error) -> str:
    """jsonschema's message, made specific where it would only repeat the whole instance."""
    if error.validator == "contains":
        kind = error.validator_value.get("$ref", "").rsplit("/", 1)[-1].removesuffix("_task")
        why = "a federated workflow needs local_train, aggregate and evaluate tasks" \
            if "then" in error.schema_path else "every workflow needs one"
        return f"has no {kind} task ({why})"
    if error.validator == "pattern" and error.validator_value == "\\S":
        return "must not be empty or blank"
    if error.validator == "pattern" and error.validator_value == IDENTIFIER_PATTERN:
        return (f"{shown(error.instance)} is not an identifier (1-64 of A-Z a-z 0-9 . _ -, starting "
                f"with a letter or digit)")
    if error.validator == "not" and list(error.schema_path)[:2] == ["properties", "privacy"]:
        extra = [name for name in privacy_block.ADAPTIVE if name in (error.instance or {})]
        return (f"holds {', '.join(extra)}, which only clipping \"adaptive\" uses; drop "
                f"{'it' if len(extra) == 1 else 'them'} or set clipping to \"adaptive\"")
    if error.validator == "not":
        return "holds an aggregate task, which needs a federation (add one or drop the task)"
    if error.validator == "anyOf" and error.validator_value == [{"$ref": "#/$defs/public_key"},
                                                                  {"$ref": "#/$defs/identifier"}]:
        return (f"{shown(error.instance)} is neither a compressed secp256k1 public key (66 lowercase hex "
                f"characters starting 02 or 03) nor a node name")
    if error.validator == "uniqueItems":
        seen: list = []
        for item in error.instance:
            if item in seen:
                return f"lists {shown(item)} more than once"
            seen.append(item)
    message = error.message
    return message if len(message) <= 200 else message[:197] + "..."


def schema_errors(definition: Any) -> list[str]:
    """Every way `definition` breaks the JSON Schema, as "path: reason" lines, most specific first."""
    errors = sorted(_schema_validator().iter_errors(definition),
                    key=lambda e: (-len(e.absolute_path), _GENERIC_LAST.get(e.validator, 0),
                                   list(map(str, e.absolute_path)), e.message))
    return [f"{_json_path(e.absolute_path)}: {_schema_message(e)}" for e in errors]


def check_definition(definition: Any, *, allow_node_names: bool = False) -> dict:
    """The client's full check: the JSON Schema first, then every rule the processor applies."""
    problems = schema_errors(definition)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DefinitionError(f"workflow definition does not match {SCHEMA_FILE}: {problems[0]}{more}")
    return validate_definition(definition, allow_node_names=allow_node_names)
