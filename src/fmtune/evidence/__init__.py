"""Evidence: metrics and bootstrap, baselines, retention, domain shift, learning curve, inference cost, the verdict."""
