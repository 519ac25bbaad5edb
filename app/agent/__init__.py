"""The agent: task schemas, model tiers, the LLM <-> tools loop and the events it yields."""
