"""The store: one API over any fsspec URL, every key it holds, leases, content hashes, redaction."""
