"""Multi-rank execution: process groups from the plan's placement, pipeline sends and receives,
per-task reductions across ranks, and the launcher `muxtune-run` uses for multi-rank plans."""
