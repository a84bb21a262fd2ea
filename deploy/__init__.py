"""Deployment on Flower's deployment engine: a private PKI, the SuperLink/SuperNode launcher and ``fed deploy``."""
