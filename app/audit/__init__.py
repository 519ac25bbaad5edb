"""The audit log: one row per request, with its tokens and cost, written off the hot path and never lost."""
