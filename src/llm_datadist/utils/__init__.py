"""Internal helpers of the public facade: argument checks, addresses and the package loggers."""
