"""Runs: the typed config, the resolved plan, each stage's units, run ids and manifests."""
