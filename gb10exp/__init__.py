"""gb10exp: declarative quantization experiments (modelopt + Hydra + MLflow) for NVIDIA GB10 and beyond."""

__version__ = "0.1.0"

import warnings

# nvidia-modelopt 0.47 warns on import that it was tested with transformers 4.57 to 5.14. gb10exp's CI runs
# transformers 5.24 (pyproject's lower bound) and its tests exercise every modelopt path gb10exp uses on it
# (quantize in each format with calibration, mto.save/restore, export_hf_checkpoint); an older transformers
# would reopen CVE-2026-4372 (< 5.3 with the `kernels` package). So the warning says nothing new here.
warnings.filterwarnings("ignore", message=r"transformers \S+ is not tested with current version of modelopt")
