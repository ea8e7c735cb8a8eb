"""Many runs: grids of configs run locally or as Slurm job arrays (``grid``, ``slurm``) and W&B sweeps
(``sweep``)."""
