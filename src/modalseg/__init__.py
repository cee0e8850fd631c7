"""modalseg: multi-modal medical image segmentation (paired fusion and unpaired learning)."""

__version__ = "0.1.0"
