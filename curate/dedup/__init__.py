"""Near-duplicate detection: MinHash signatures, LSH buckets, connected components."""
