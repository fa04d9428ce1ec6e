"""PIE-Bench evaluation (Ju et al. 2023, "Direct Inversion"): its metrics, computed as its official code does."""
