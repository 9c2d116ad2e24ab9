"""Slurm compute for Airflow 3: the CLI hook, the deferrable job trigger, and the Airflow-free logic under them.

* :mod:`plugins.slurm.core` — settings, sbatch/script building, job environment, scontrol/sacct parsing, states
  (no Airflow, no cluster needed);
* :mod:`plugins.slurm.resources` — the resource rule (model size × quantization → GPUs, constraint, memory, time);
* :mod:`plugins.slurm.hook` — ``SlurmHook`` (submit / state / cancel / tail);
* :mod:`plugins.slurm.trigger` — ``SlurmJobTrigger`` (async polling in the triggerer).

Importing this package imports neither Airflow nor ``pipeline``.
"""
