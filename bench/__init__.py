"""itera-bench: measured comparisons of exported bundles (no torch)."""
