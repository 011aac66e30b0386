"""kvrag-client: the Python SDK of the kvrag memory database."""

__version__ = "0.1.0"
