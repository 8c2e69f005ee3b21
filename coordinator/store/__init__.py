"""Persistence (SQLModel): accounts, API keys, ledger, receipts. SQLite by default."""
