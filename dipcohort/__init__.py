"""dipcohort's command line (the top of the import graph: it imports pipeline and schedulers, never the reverse)."""
