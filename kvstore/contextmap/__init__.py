"""The per-bank context map: what the bank holds in brief, refreshed from recorded questions."""
