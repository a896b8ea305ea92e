"""The run registry: run folders (the source of truth) and the SQLite index over them."""
