"""Private transports: they move bytes between registered memory, nothing else."""
