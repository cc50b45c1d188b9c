"""README.md's "## Layout" table matches the tree.

Every path the table names exists (a folder in its first column; a module, file, folder or glob
such as `workflow_*.py` named in backticks in its text, taken relative to the row's folder or the
repository root), each row's package is the one pyproject.toml maps to its folder, and nothing
of the tree is left out: every top-level folder has a row, and every folder directly inside a
row's folder (a sub-package such as scheduling/schedule/, or tests/helpers/) has a row or is
named in one. The tree is what git tracks plus what it does not ignore, as `duplicates` reads it.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATH_LIKE = re.compile(r"[/*]|\.(py|json|toml|yml|yaml|ini|sh|md|gz)$")


def layout_rows(readme: str) -> list[tuple[list[str], str, list[str]]]:
    """(folders, package, names in the text) of each row of the Layout section's table."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "folder":
            continue
        assert len(cells) == 3, f"a Layout row without three cells: {line}"
        folders, package, text = (re.findall(r"`([^`]+)`", cell) for cell in cells)
        rows.append((folders, package[0] if package else "", text))
    assert rows, "README.md's Layout section has no table"
    return rows


def tree_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("the tree is read through git")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode()
    return [path for path in listed.split("\0") if path and (ROOT / path).exists()]


def matches(base: pathlib.Path, name: str) -> list[pathlib.Path]:
    """What `name` (a path, a folder ending in "/", or a glob) names below `base`."""
    found = sorted(base.glob(name.rstrip("/")))
    return [path for path in found if path.is_dir() or not name.endswith("/")]


def package_folders() -> dict[str, str]:
    """Package -> its folder, from pyproject.toml's package-dir (a package not listed there sits
    in its parent's folder)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    folders = {}
    for package in setuptools["packages"]:
        parent, _, child = package.rpartition(".")
        folders[package] = mapped.get(package) or f"{mapped.get(parent, parent.replace('.', '/'))}/{child}"
    return folders


def layout_problems(readme: str, files: list[str]) -> list[str]:
    problems: list[str] = []
    rows = layout_rows(readme)
    packages = package_folders()
    named: set[pathlib.Path] = set()
    row_folders: set[str] = set()
    for folders, package, text in rows:
        bases = []
        for folder in folders:
            found = matches(ROOT, folder)
            if not found:
                problems.append(f"the Layout table lists `{folder}`, which is not in the tree")
            named.update(found)
            if folder.endswith("/"):
                row_folders.add(folder.rstrip("/"))
                bases.append(ROOT / folder)
        if package and packages.get(package) not in [folder.rstrip("/") for folder in folders]:
            problems.append(f"the Layout table gives `{package}` for {', '.join(folders)}, but pyproject.toml "
                            f"puts that package in {packages.get(package) or 'no folder (not a package)'}")
        for name in text:
            if " " in name or not PATH_LIKE.search(name):
                continue  # a command (`trustmesh iot-host`) or a word, not a path
            found = [path for base in [*bases, ROOT] for path in matches(base, name)]
            if not found:
                problems.append(f"the Layout row of {', '.join(folders)} names `{name}`, which is not in the tree")
            named.update(found)
    covered = {str(path.relative_to(ROOT)) for path in named}
    covered |= {str(parent.relative_to(ROOT)) for path in named for parent in path.parents if ROOT in parent.parents}
    folders_of_tree = {str(parent) for path in files for parent in pathlib.PurePath(path).parents} - {"."}
    for folder in sorted(folders_of_tree):
        parts = folder.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        top_level = len(parts) == 1
        inside_a_row = "/".join(parts[:-1]) in row_folders
        if (top_level and folder not in row_folders) or (inside_a_row and folder not in covered):
            problems.append(f"{folder}/ is in the tree but not in the Layout table")
    for package, folder in sorted(packages.items()):
        if folder not in row_folders and folder not in covered:
            problems.append(f"package {package} ({folder}/) is not in the Layout table")
    return problems


def test_the_layout_table_matches_the_tree():
    problems = layout_problems((ROOT / "README.md").read_text(), tree_files())
    assert not problems, "README.md ## Layout:\n" + "\n".join(problems)


def test_the_check_sees_a_missing_path_and_a_missing_folder():
    readme, files = (ROOT / "README.md").read_text(), tree_files()
    broken = readme.replace("`definition_stored.py`", "`definition_gone.py`", 1)
    assert "the Layout row of scheduling/ names `definition_gone.py`, which is not in the tree" \
        in layout_problems(broken, files)
    without_tools = "\n".join(line for line in readme.splitlines() if not line.startswith("| `tools/`"))
    assert "tools/ is in the tree but not in the Layout table" in layout_problems(without_tools, files)
    assert "scheduling/schedule/ is in the tree but not in the Layout table" \
        in layout_problems(readme.replace("`schedule/`", "schedule", 1), files)
