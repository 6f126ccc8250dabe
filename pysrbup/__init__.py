"""pysrbup: secure remote backups over gRPC to an untrusted server."""

__version__ = "0.1.0"
