"""Choosing what not to back up: restic's exclude patterns and rules.

Pattern language (restic's ``--exclude``):

* A pattern is matched against the absolute path of each file and directory,
  component by component. ``*`` and ``?`` and ``[...]`` match within one
  component (``fnmatch`` without crossing ``/``); ``**`` matches any number
  of components, including none.
* A pattern starting with ``/`` is anchored at the root; any other pattern
  may match starting at any component (``*.tmp`` excludes every ``.tmp`` file,
  ``cache/*.bin`` every ``.bin`` directly below any ``cache``).
* A pattern matches a path when it matches the path or one of its parents, so
  excluding a directory excludes everything below it.
* ``--iexclude`` is the same, case-insensitive. ``--exclude-file FILE`` reads
  one pattern per line; blank lines and lines starting with ``#`` are
  skipped, leading and trailing spaces are trimmed, ``$VAR`` is expanded.

Other rules: ``--exclude-caches`` and ``--exclude-if-present NAME[:HEADER]``
leave out the contents of a directory holding that file (the directory itself
is kept, empty); ``--exclude-larger-than SIZE`` (``2048``, ``500K``, ``1M``,
``2G``, ``1T``) leaves out bigger files; ``--one-file-system`` does not
descend into directories on another file system than the backed-up one.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field

from pysrbup.errors import UsageError

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``500K`` -> 512000 (restic's suffixes, powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with K, M, G or T")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def read_pattern_file(path: str) -> list[str]:
    """The patterns of an exclude file (restic's format, see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read exclude file {path}: {exc}") from None
    patterns = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(os.path.expandvars(line))
    return patterns


class Pattern:
    """One compiled exclude pattern."""

    def __init__(self, text: str, ignore_case: bool = False):
        if not text:
            raise UsageError("an empty exclude pattern matches nothing")
        self.text = text
        self.anchored = text.startswith("/")
        self.ignore_case = ignore_case
        parts = [p for p in text.strip("/").split("/") if p]
        if ignore_case:
            parts = [p.lower() for p in parts]
        self.parts = parts

    def matches(self, components: list[str]) -> bool:
        """Whether the pattern matches the path (given as components) or a parent of it."""
        if self.ignore_case:
            components = [c.lower() for c in components]
        starts = [0] if self.anchored else range(len(components))
        return any(_match_prefix(self.parts, components, start) for start in starts)

    def may_match_below(self, components: list[str]) -> bool:
        """Whether the pattern can match the directory ``components`` or a path below it.

        Only an anchored pattern can rule that out: one that may start at any
        component may match anywhere below.
        """
        if not self.anchored:
            return True
        if self.ignore_case:
            components = [c.lower() for c in components]
        for part, component in zip(self.parts, components, strict=False):
            if part == "**":
                return True
            if not fnmatch.fnmatchcase(component, part):
                return False
        return True  # the directory is a prefix of what it matches, or matched by it


def _match_prefix(parts: list[str], components: list[str], start: int) -> bool:
    """Whether ``parts`` match ``components[start:start + k]`` for some k (a parent counts)."""
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "**":
        return any(_match_prefix(rest, components, i) for i in range(start, len(components) + 1))
    if start >= len(components):
        return False
    if not fnmatch.fnmatchcase(components[start], head):
        return False
    return _match_prefix(rest, components, start + 1)


@dataclass
class Excludes:
    """Every rule of one backup; ``skip`` says whether a path is left out."""

    patterns: list[Pattern] = field(default_factory=list)
    if_present: list[tuple[str, bytes]] = field(default_factory=list)
    larger_than: int | None = None
    one_file_system: bool = False

    @classmethod
    def from_options(
        cls,
        exclude: list[str] | None = None,
        iexclude: list[str] | None = None,
        exclude_files: list[str] | None = None,
        exclude_caches: bool = False,
        exclude_if_present: list[str] | None = None,
        exclude_larger_than: str | None = None,
        one_file_system: bool = False,
    ) -> Excludes:
        texts = list(exclude or [])
        for path in exclude_files or []:
            texts += read_pattern_file(path)
        rules = cls(
            patterns=[Pattern(t) for t in texts] + [Pattern(t, True) for t in iexclude or []],
            one_file_system=one_file_system,
        )
        for spec in exclude_if_present or []:
            name, _, header = spec.partition(":")
            rules.if_present.append((name, header.encode()))
        if exclude_caches:
            rules.if_present.append((CACHEDIR_TAG, CACHEDIR_SIGNATURE))
        if exclude_larger_than:
            rules.larger_than = parse_size(exclude_larger_than)
        return rules

    def excluded(self, path: str) -> bool:
        """Whether the patterns leave ``path`` (absolute) out."""
        if not self.patterns:
            return False
        components = [c for c in path.split("/") if c]
        return any(p.matches(components) for p in self.patterns)

    def may_match_below(self, directory: str) -> bool:
        """Whether a pattern can match ``directory`` or something below it (to prune walks)."""
        components = [c for c in directory.split("/") if c]
        return any(p.may_match_below(components) for p in self.patterns)

    def too_large(self, size: int) -> bool:
        return self.larger_than is not None and size > self.larger_than

    def contents_excluded(self, directory: str) -> bool:
        """Whether a tag file in ``directory`` asks to leave its contents out."""
        for name, header in self.if_present:
            try:
                with open(os.path.join(directory, name), "rb") as handle:
                    if not header or handle.read(len(header)) == header:
                        return True
            except OSError:
                continue
        return False
