"""Tools the agent (and clients, directly) can call: registry, schemas and built-ins."""
