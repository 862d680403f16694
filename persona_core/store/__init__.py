"""The store: one API over any fsspec URL (`store`), every key it holds (`layout`), the grammar of
identifiers in keys (`ids`), leases (`lease`), content hashes (`hashing`), redaction (`redact`)."""
