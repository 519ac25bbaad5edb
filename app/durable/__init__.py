"""Durable, off-the-hot-path writing of rows: a journal on disk, a batched background writer, dead letters."""
