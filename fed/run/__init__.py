"""What a run leaves on disk: the run directory, checkpoints and the exported adapter."""
