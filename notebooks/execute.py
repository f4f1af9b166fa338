"""Execute a notebook headless in the project's environment (`make notebook`): every cell top to
bottom in a fresh kernel, the executed copy (with outputs and plots) written to logs/notebooks/.

    python notebooks/execute.py notebooks/evaluate.ipynb
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(path: str) -> Path:
    src = Path(path).resolve()
    nb = nbformat.read(src, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(src.parent)}}).execute()
    out = src.parents[1] / "logs" / "notebooks" / src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    print(f"executed {src.name}: {len(nb.cells)} cells, {images} images -> {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "notebooks/evaluate.ipynb")
