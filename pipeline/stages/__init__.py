"""The stages of a sweep, one module each, every one owning its cycle:

- a frozen dataclass for its work item (paths, row indices and its part of the typed config: no tensors,
  so an item travels through Ray as a few hundred bytes);
- `plan(...)`: its items, from the previous stage's files and the config, each named by a content key;
- `run(model, tokenizer, item) -> paths`: the compute on a model actor, publishing its outputs atomically;
- `collect(...)` where the driver makes something of the outputs (pairs: the screened batches ->
  pairs.parquet).

pairs -> cache -> patch -> summary, with circuit beside cache/patch/summary and direction after (the
graph: pipeline.run.sweep). `shards` plans the pair shards that cache and patch work on. Stages know
nothing of Ray, MLflow or Hydra; the model is loaded once per actor and passed in, and the checksums and
manifests are the runner's business.
"""
