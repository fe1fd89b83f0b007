from .circuits import mean_difference, ablate_direction_metrics, add_direction_metrics  # noqa TEMP SHIM
