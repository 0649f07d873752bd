"""Set-up tools: what the Makefile runs before any ftsearch code."""
