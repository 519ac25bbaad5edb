"""LLM providers behind one protocol: an OpenAI-compatible upstream and the built-in simulator."""
