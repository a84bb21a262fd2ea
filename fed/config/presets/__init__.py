"""The shipped presets (TOML), read as package data by ``fed.config.sources``."""
