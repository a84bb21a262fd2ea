"""The privacy reproductions of issue 34 (../shared/research/privacy-repro-2/), ported to the current code."""
