"""Serving: predictors for every task kind and the authenticated HTTP server."""
