"""The runner: what is the same for every task kind (run folder, console, report, shared choices); tasks only return data."""
