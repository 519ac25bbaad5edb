"""API keys: storage, lookup and the Principal they authenticate."""
