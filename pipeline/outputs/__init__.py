"""What a person reads: the heatmaps, the circuit diagram and the report, and the one registry of a run
folder's files (pipeline.outputs.files) that the manifest, MLflow and the report all use."""
