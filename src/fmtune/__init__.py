"""fmtune: fine-tune a foundation model on labeled data and prove, on held-out data, what it bought."""

__version__ = "0.1.0"
