"""Paper 1 (Li et al.) paired fusion models: registration of the ten Table 1 configurations."""
