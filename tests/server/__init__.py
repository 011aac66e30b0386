"""Tests of server/ parts, mirroring its tree."""
