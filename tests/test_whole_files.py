"""write_whole: readers find a file whole or not at all; an exclusive write never replaces one."""

import errno
import multiprocessing
import os
import stat

from trustmesh.whole_files import write_whole

OLD, NEW = b"a" * (1 << 20), b"b" * (1 << 20)  # a megabyte each: a write of it is many pages


def _rewrite_forever(path) -> None:
    while True:
        for data in (OLD, NEW):
            write_whole(path, data, durable=False)


def test_a_reader_never_sees_part_of_a_file_being_rewritten(tmp_path):
    path = tmp_path / "state.bin"
    write_whole(path, OLD)
    writer = multiprocessing.get_context("fork").Process(target=_rewrite_forever, args=(path,), daemon=True)
    writer.start()
    try:
        seen = set()
        for _ in range(300):
            data = path.read_bytes()
            assert data in (OLD, NEW), f"read {len(data)} bytes, neither whole version"
            seen.add(data[:1])
        assert seen == {b"a", b"b"}  # the writer did rewrite it meanwhile
    finally:
        writer.kill()
        writer.join()


def test_an_exclusive_write_keeps_the_first_file(tmp_path):
    path = tmp_path / "node.priv"
    assert write_whole(path, "first\n", mode=0o600, exclusive=True)
    assert not write_whole(path, "second\n", mode=0o600, exclusive=True)
    assert path.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["node.priv"]  # the loser's temporary is gone


def test_the_mode_is_the_one_asked_for_whatever_the_umask(tmp_path):
    old_umask = os.umask(0o077)
    try:
        write_whole(tmp_path / "node.pub", "public\n", mode=0o644)
    finally:
        os.umask(old_umask)
    old_umask = os.umask(0)
    try:
        write_whole(tmp_path / "node.priv", "secret\n", mode=0o600)
        write_whole(tmp_path / "node.priv", "secret, replaced\n", mode=0o600)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "node.pub").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "node.priv").stat().st_mode) == 0o600
    assert (tmp_path / "node.priv").read_text() == "secret, replaced\n"


def test_without_hard_links_an_exclusive_write_still_never_replaces_a_file(tmp_path, monkeypatch):
    # Some file systems mounted into containers refuse link(2); there the file is created in place.
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr("os.link", no_links)
    path = tmp_path / "node.priv"
    assert write_whole(path, "first\n", mode=0o600, exclusive=True)
    assert not write_whole(path, "second\n", mode=0o600, exclusive=True)
    assert path.read_text() == "first\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.priv"]
