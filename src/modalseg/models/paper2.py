"""Paper 2 (Chen et al.) unpaired backbone(s) and modality-specific batch norm: registration."""
