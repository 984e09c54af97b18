"""Attribution, gate weights, lead ablation and wave-level attribution."""
