"""Running sweeps: Ray workers and their pool (workers), the stage graph of one model's sweep (sweep),
and MLflow tracking (tracking). Only this layer knows Ray and MLflow."""
