"""Where the checkout's files are, for tests (the library itself does not know its checkout)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
SRC_DIR = PROJECT_ROOT / "src"
SHIPPED_DIR = PROJECT_ROOT / "data" / "shipped"
