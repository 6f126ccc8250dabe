"""Tree nodes from ``lstat``: type, mode, owners (by id and name), times, xattrs, links.

Regular files get their chunks from ``FileSaver`` afterwards; directories
their subtree when the directory is stored.
"""

from __future__ import annotations

import os
import stat

from pysrbup.proto import repo_pb2


def owner_names(uid: int, gid: int) -> tuple[str, str]:
    """The user and group names of ``uid`` and ``gid`` ("" where there is none)."""
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = ""
    try:
        import grp

        group = grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        group = ""
    return user, group


_SPECIAL = {
    stat.S_IFIFO: repo_pb2.NODE_FIFO,
    stat.S_IFCHR: repo_pb2.NODE_CHARDEV,
    stat.S_IFBLK: repo_pb2.NODE_BLOCKDEV,
}


class NodeMaker:
    """Builds nodes; caches owner names per (uid, gid)."""

    def __init__(self, read_xattrs: bool = True):
        self.read_xattrs = read_xattrs
        self._names: dict[tuple[int, int], tuple[str, str]] = {}

    def base(self, name: bytes, st: os.stat_result, kind: int) -> repo_pb2.Node:
        """The node every kind starts from: name, type, mode, owner, mtime."""
        key = (st.st_uid, st.st_gid)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = owner_names(*key)
        return repo_pb2.Node(
            name=name,
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            user=names[0],
            group=names[1],
        )

    def xattrs(self, path: str, node: repo_pb2.Node) -> None:
        """Adds the extended attributes of ``path`` (not followed) to ``node``."""
        if not self.read_xattrs:
            return
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return  # not supported here, or not allowed: nothing to keep
        for attr in sorted(names):
            try:
                value = os.getxattr(path, attr, follow_symlinks=False)
            except OSError:
                continue
            node.xattrs.add(name=os.fsencode(attr), value=value)

    def file(self, path: str, name: bytes, st: os.stat_result) -> repo_pb2.Node:
        """A regular file's node, without its chunks."""
        node = self.base(name, st, repo_pb2.NODE_FILE)
        if st.st_nlink > 1:  # restored as hard links to one another
            node.device, node.inode, node.links = st.st_dev, st.st_ino, st.st_nlink
        self.xattrs(path, node)
        return node

    def directory(self, path: str, name: bytes, st: os.stat_result) -> repo_pb2.Node:
        node = self.base(name, st, repo_pb2.NODE_DIR)
        self.xattrs(path, node)
        return node

    def other(self, path: str, name: bytes, st: os.stat_result) -> repo_pb2.Node | None:
        """A symlink's or special file's node; None for a socket (not backed up).

        OSError if a symlink cannot be read.
        """
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.fsencode(os.readlink(path))
            node = self.base(name, st, repo_pb2.NODE_SYMLINK)
            node.link_target = target
        else:
            kind = _SPECIAL.get(stat.S_IFMT(mode))
            if kind is None:
                return None
            node = self.base(name, st, kind)
            node.rdev = st.st_rdev if kind != repo_pb2.NODE_FIFO else 0
        self.xattrs(path, node)
        return node
