"""What persists: the catalog (SQL), blob stores (local files, S3), the vector index, keys, jobs."""
