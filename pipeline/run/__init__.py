"""Running sweeps: Ray workers and their pool (workers), the stage graph of one model's sweep (sweep),
the command's jobs run at once (multirun), MLflow tracking (tracking), and the behaviour screen alone
(screen). Only this layer knows Ray and MLflow."""
