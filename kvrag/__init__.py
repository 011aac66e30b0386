"""kvrag command line (``kvrag``): serve, ingest, query and manage a kvrag server."""

__version__ = "0.1.0"
