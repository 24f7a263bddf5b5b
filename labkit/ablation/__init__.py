"""Lab 08: ablation studies (placeholder: the lead owns this file and its exports)."""
