"""One error tree for pysrbup.

Every error the user can cause or meet carries its own exit code; the CLI
turns any ``PysrbupError`` into a one-line message on stderr and that code.
Exit codes follow restic: 1 fatal, 2 usage, 3 finished but incomplete.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3


class PysrbupError(Exception):
    """Base class of every error reported to the user as one line."""

    exit_code = EXIT_ERROR


class UsageError(PysrbupError):
    """The command line is wrong."""

    exit_code = EXIT_USAGE


class KeyFileError(PysrbupError):
    """The key file is missing, unreadable or malformed."""


class PutOnlyKeyError(PysrbupError):
    """A put-only key was given to a command that reads or destroys backups."""


class WrongKeyError(PysrbupError):
    """The key does not belong to this repository."""


class ServerUnavailableError(PysrbupError):
    """The server cannot be reached or dropped the connection."""


class TransportSecurityError(PysrbupError):
    """TLS cannot protect the connection: another certificate, an untrusted one, or no TLS."""


class ServerError(PysrbupError):
    """The server refused or failed a request."""


class NotFoundError(PysrbupError):
    """An id (backup, object) is unknown to the repository."""


class PermissionDeniedError(PysrbupError):
    """The server refused a destructive request (no valid proof, append-only)."""


class IntegrityError(PysrbupError):
    """Stored data failed verification (tampered, truncated, swapped or rotten)."""


class RepositoryError(PysrbupError):
    """The repository on disk is missing, damaged or of an unknown format."""


class StorageFullError(PysrbupError):
    """The server ran out of disk space; nothing stored was damaged."""


class RestoreTargetError(PysrbupError):
    """The restore target already holds files (use --force to overwrite)."""


class IncompleteError(PysrbupError):
    """The command finished, but some files could not be read or restored."""

    exit_code = EXIT_INCOMPLETE


class ConflictError(PysrbupError):
    """A concurrent change got in the way; the request can be retried."""


class ConcurrentDeleteError(PysrbupError):
    """A concurrent delete removed data a running backup relies on; run the backup again."""
