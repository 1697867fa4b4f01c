"""Data audit: duplicates, train/test leakage, class balance, PII by kind, plain-words warnings."""
