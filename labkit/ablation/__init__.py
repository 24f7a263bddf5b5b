"""Lab 08: ablation studies (paired seeds, confidence intervals, crash-safe resume); the lead fills this in."""
