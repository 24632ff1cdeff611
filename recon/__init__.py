"""dipcohort's science: forward operators, DIP networks, solvers and metrics, usable alone."""
