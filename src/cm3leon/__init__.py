"""CM3Leon: retrieval-augmented, token-based, decoder-only multimodal model (arXiv 2309.02591).

Importing the package has no side effects: it sets no environment variable and reads no file.
The checkout's root is known only to the entry scripts in `src/` (through `cm3leon.cli`) and to
Hydra's `paths` config.
"""

__version__ = "0.1.0"
