"""ledger/protos.py finds each generated module's embedded descriptor by pattern: the same bytes as
parsing the whole module gives, for every module of the pinned SDK."""

import ast

import pytest

from trustmesh.ledger import protos


def _by_parsing(path) -> bytes:
    """The reference: the `serialized_pb=` keyword's literal, from the module's syntax tree."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
            found.append(value.value if isinstance(value.value, bytes) else value.value.encode("latin1"))
    assert len(found) == 1, path
    return found[0]


def test_the_descriptor_found_by_pattern_is_the_one_in_the_syntax_tree():
    paths = sorted(protos._sdk_protobuf_dir().glob("*_pb2.py"))
    assert len(paths) >= 20  # the pinned SDK's modules, all of them
    for path in paths:
        assert protos._embedded_descriptor(path) == _by_parsing(path), path.name


def test_a_module_without_exactly_one_descriptor_is_refused(tmp_path):
    none = tmp_path / "none_pb2.py"
    none.write_text("DESCRIPTOR = None\n")
    with pytest.raises(ImportError, match="found 0"):
        protos._embedded_descriptor(none)
    two = tmp_path / "two_pb2.py"
    two.write_text("a = f(serialized_pb=_b('\\x01'))\nb = f(serialized_pb=_b('\\x02'))\n")
    with pytest.raises(ImportError, match="found 2"):
        protos._embedded_descriptor(two)
