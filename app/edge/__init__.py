"""Edge limits: per-client-address limits checked before a request can cost a key lookup.

settings.py is `server.edge`; storage.py the bounded in-process counters; limiter.py the counting, the
blocks and the Redis fail-open; middleware.py the ASGI middleware that refuses with 429 edge_rate_limited.
"""
