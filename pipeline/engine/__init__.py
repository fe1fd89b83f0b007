"""Model-side code: torch + transformers only (no Ray, MLflow or Hydra), usable from a notebook."""
