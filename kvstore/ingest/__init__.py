"""Ingest-side text handling: splitting a document into blocks."""
