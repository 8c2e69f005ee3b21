"""Money: integer micro-units, double-entry postings, prices. Pure code, no I/O."""
