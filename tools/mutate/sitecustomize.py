"""Loaded at start-up by tools/mutate/run (on PYTHONPATH): points the editable install's package
map (pyproject.toml's package-dir: trustmesh.* -> the repository's folders) at the copy named by
TRUSTMESH_MUT_ROOT, so the tests, and the processes they start, import the copy's code, broken on
purpose, and not the work tree's."""

import os

_root = os.environ.get("TRUSTMESH_MUT_ROOT")
if _root:
    import sys

    for _module in [m for name, m in list(sys.modules.items()) if name.startswith("__editable___trustmesh_fl_")]:
        _mapping = getattr(_module, "MAPPING", None)
        if _mapping:
            _source = os.path.commonpath(list(_mapping.values()))  # the work tree
            for _key, _value in list(_mapping.items()):
                _mapping[_key] = os.path.join(_root, os.path.relpath(_value, _source))
