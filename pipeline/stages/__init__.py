"""Pipeline stages: plain functions of (config values, input files) -> tables/files, importing the
engine but nothing of Ray, MLflow or Hydra."""
