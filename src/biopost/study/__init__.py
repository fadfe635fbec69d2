"""Studies: a base pipeline plus axes (config.py) -> a plan of runs sharing exact prefixes (plan.py,
branch.py) -> executors, local / Ray / SLURM (execute.py) -> one tidy results table (results.py)."""
