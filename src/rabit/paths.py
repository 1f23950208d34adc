"""Where rabit keeps its caches: one root, set by one environment variable.

``cache_root()`` is ``$RABIT_CACHE`` if set, else ``$XDG_CACHE_HOME/rabit``, else ``~/.cache/rabit``. Below it:
``models/`` (the default model's folder), ``tokens/`` (tokenized corpora), ``init/`` (initialized paths),
``ppl/`` (full-precision perplexities) and ``kernels/`` (the compiled native CPU kernel).
The older ``RABIT_CACHE_DIR`` (once read by the kernel build only) is still honoured when ``RABIT_CACHE`` is not
set, with a one-line notice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_ENV = "RABIT_CACHE"
DEPRECATED_CACHE_ENV = "RABIT_CACHE_DIR"
_noticed = False


def cache_root() -> Path:
    """The root folder of every rabit cache (not created here)."""
    global _noticed
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.environ.get(DEPRECATED_CACHE_ENV)
        if root and not _noticed:
            _noticed = True
            print(f"rabit: {DEPRECATED_CACHE_ENV} is deprecated, set {CACHE_ENV} instead (using {root})",
                  file=sys.stderr)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rabit"


__all__ = ["cache_root", "CACHE_ENV"]
