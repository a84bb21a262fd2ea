"""Finished studies of the `private` preset, kept runnable (docs/studies/ holds what they found)."""
