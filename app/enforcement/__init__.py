"""Enforcement: who may spend what, protecting upstreams and tools."""
