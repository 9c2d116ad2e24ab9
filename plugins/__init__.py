"""Airflow glue: the Slurm hook/trigger/operator and the operator that runs a pipeline stage locally or on Slurm."""
