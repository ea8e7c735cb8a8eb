"""fedmoe-pl: pFedMoE and its baselines as PyTorch Lightning modules under one federation loop."""

__version__ = "0.1.0"
