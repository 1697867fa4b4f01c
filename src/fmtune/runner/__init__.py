"""The runner: what is the same for every task kind (run folder lifecycle, stage order, ladder, curve, verdict, report, registry row)."""
