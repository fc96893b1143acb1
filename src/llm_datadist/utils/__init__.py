"""Internal helpers of the public facade: argument checks and the package logger."""
