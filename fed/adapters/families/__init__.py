"""The shipped adapter families, one module each: importing this package imports every module in it, and each
registers its family (``@register_family``), so adding a family is adding its module. LoRA, which the others
extend, comes first; the rest in name order."""

import importlib
import pkgutil

for _name in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda name: (name != "lora", name)):
    importlib.import_module(f"{__name__}.{_name}")
