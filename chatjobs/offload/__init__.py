"""Offloading eligible jobs to a provider's own batch API (docs/design-offload.md)."""
