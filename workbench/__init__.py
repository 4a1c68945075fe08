"""flatquant workbench: train networks that are flat before they are quantized."""

__version__ = "0.1.0"
