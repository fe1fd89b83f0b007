"""patchsweep: activation-patching sweeps that localise refusal in transformers."""

from pipeline.provenance import version as _version

__version__ = _version()


def load_run(path, verify: bool = True):
    """A finished run folder's tables, circuit and config (pipeline.outputs.load.Run); `verify` checks
    its files against their checksums first."""
    from pipeline.outputs.load import load_run as load  # on use: `import pipeline` stays light

    return load(path, verify)


def load_runs(root, verify: bool = True):
    """Every finished run under an output root, --multirun jobs included and MLflow's copies of their
    files left out, with their tables concatenated (pipeline.outputs.load.Runs)."""
    from pipeline.outputs.load import load_runs as load

    return load(root, verify)
