"""Storage of finished runs: the registry and lineage (manifests, hashes, verify)."""
