"""Benchmarks: run with `python -m benchmarks.chat_proxy` (see that module)."""
