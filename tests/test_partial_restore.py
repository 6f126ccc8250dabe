"""Getting one file back: restore --include/--exclude and ID:subpath fetch only what they need."""

from __future__ import annotations

import json

from helpers import assert_no_traceback, backup_id_in
from trees import random_bytes, snapshot_tree


def _tree(tmp_path):
    src = tmp_path / "src"
    for d in ("docs", "data/big", "data/small"):
        (src / d).mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    (src / "docs" / "b.md").write_text("beta\n")
    for i in range(4):
        (src / "data" / "big" / f"blob{i}.bin").write_bytes(random_bytes(3 * 1024 * 1024, i))
    (src / "data" / "small" / "one.bin").write_bytes(random_bytes(1024 * 1024, 9))
    (src / "data" / "small" / "notes.txt").write_text("notes\n")
    return src


def _restore(client, key_file, spec: str, out, *flags: str) -> dict:
    proc = client.run("--json", "restore", spec, str(out), key_file, *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_include_and_exclude_restore_only_what_matches(tmp_path, client, key_file):
    src = _tree(tmp_path)
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    full = _restore(client, key_file, backup_id, tmp_path / "full")
    one = _restore(
        client, key_file, backup_id, tmp_path / "one", "--include", "src/data/small/one.bin"
    )
    assert _files(tmp_path / "one") == {"src/data/small/one.bin"}
    assert (tmp_path / "one" / "src/data/small/one.bin").read_bytes() == (
        src / "data/small/one.bin"
    ).read_bytes()
    # One 1 MiB file out of 13 MiB: a small part of what a full restore fetches.
    assert one["bytes_fetched"] < 0.12 * full["bytes_fetched"], (one, full)
    texts = _restore(client, key_file, backup_id, tmp_path / "texts", "--include", "*.txt")
    assert _files(tmp_path / "texts") == {"src/docs/a.txt", "src/data/small/notes.txt"}
    _restore(client, key_file, backup_id, tmp_path / "nobig", "--exclude", "big")
    assert not any("big" in f for f in _files(tmp_path / "nobig"))
    assert "src/docs/b.md" in _files(tmp_path / "nobig")
    both = tmp_path / "both"
    _restore(client, key_file, backup_id, both, "--include", "src/data", "--exclude", "*.bin")
    assert _files(both) == {"src/data/small/notes.txt"}
    assert texts["files"] == 2


def test_a_subpath_is_restored_as_the_root(tmp_path, client, key_file):
    src = _tree(tmp_path)
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    out = tmp_path / "sub"
    report = _restore(client, key_file, f"{backup_id}:data/small", out)
    assert _files(out) == {"one.bin", "notes.txt"}
    assert snapshot_tree(str(out)) == snapshot_tree(str(src / "data" / "small"))
    single = tmp_path / "single"
    _restore(client, key_file, f"{backup_id}:docs/a.txt", single)
    assert _files(single) == {"a.txt"} and (single / "a.txt").read_text() == "alpha\n"
    assert report["bytes_fetched"] < 3 * 1024 * 1024
    missing = client.run("restore", f"{backup_id}:no/such/path", str(tmp_path / "x"), key_file)
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    assert_no_traceback(missing)


def test_an_anchored_include_reads_only_the_trees_on_its_way(tmp_path, client, key_file):
    src = tmp_path / "src"
    for d in range(40):
        for sub in ("a", "b"):
            (src / f"d{d:02d}" / sub).mkdir(parents=True)
            (src / f"d{d:02d}" / sub / "f.txt").write_text(f"{d} {sub}\n" * 50)
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    anchored = _restore(client, key_file, backup_id, tmp_path / "one", "--include", "/src/d07/a")
    anywhere = _restore(client, key_file, backup_id, tmp_path / "any", "--include", "d07/a")
    for root in (tmp_path / "one", tmp_path / "any"):
        assert _files(root) == {"src/d07/a/f.txt"}
        assert (root / "src/d07/a/f.txt").read_text() == "7 a\n" * 50
    # The unanchored pattern may match at any depth, so every tree is read; the
    # anchored one reads the root, src, d07 and d07/a (and the one chunk).
    assert anchored["bytes_fetched"] * 4 < anywhere["bytes_fetched"], (anchored, anywhere)
    star = _restore(client, key_file, backup_id, tmp_path / "star", "--include", "/src/d1*/b")
    assert star["files"] == 10
    assert _files(tmp_path / "star") == {f"src/d1{i}/b/f.txt" for i in range(10)}
    deep = _restore(client, key_file, backup_id, tmp_path / "deep", "--include", "/src/**/f.txt")
    assert deep["files"] == 80
