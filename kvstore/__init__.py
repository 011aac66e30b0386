"""kvrag engine: documents stored as compressed, re-positionable transformer KV cache."""

__version__ = "0.1.0"
