"""The shipped adapter families, one module each: importing this package imports every module in it, and each
registers its family (``@register_family``), so adding a family is adding its module."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
