"""Where a run's data comes from: built-in datasets and partitions, a node's own file, public centring text."""
