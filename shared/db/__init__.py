"""Postgres: the engine, the schema both services share, and its migrations."""
