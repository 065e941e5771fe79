"""Slurm cluster fixture (owned by the Slurm work)."""
