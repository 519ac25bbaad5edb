"""Conversations: session memory on a bounded, expiring pool, in process or in Redis."""
