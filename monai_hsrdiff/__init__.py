"""monai-hsrdiff: HSRDiff (Hierarchical Self-Regulation Diffusion, AAAI 2025) for MONAI."""

__version__ = "0.1.0"
