"""Builders for tests and benchmarks: tiny random-weight models, a real SeaweedFS. Never used by the service."""
