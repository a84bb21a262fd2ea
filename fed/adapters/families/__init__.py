"""The shipped adapter families, one module each; importing this package registers them in this order."""

import importlib

SHIPPED = ("lora", "ffa_lora", "moslora", "mole", "mor", "roselora", "dynamic_lora")
"""Module names, in the order ``fed config --list``, errors and the docs list the kinds."""

for _module in SHIPPED:
    importlib.import_module(f"{__name__}.{_module}")
