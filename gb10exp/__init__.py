"""gb10exp: declarative quantization experiments (modelopt + Hydra + MLflow) for NVIDIA GB10 and beyond."""

__version__ = "0.1.0"
