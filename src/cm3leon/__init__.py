"""CM3Leon: retrieval-augmented, token-based, decoder-only multimodal model (arXiv 2309.02591)."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Hydra configs read the repository root from this variable (conf/paths/default.yaml).
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))

__version__ = "0.1.0"
