"""Base models: resolving (packaged defaults, local folders) and loading them safely, encoders and causal LMs, their limits and hardware support."""
