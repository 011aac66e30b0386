"""kvrag command line (``kvrag``): serve, ingest, query and manage a kvrag server."""
