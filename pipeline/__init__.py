"""patchsweep: activation-patching sweeps that localise refusal in transformers."""

__version__ = "0.1.0"


def load_run(path, verify: bool = True):
    """A finished run folder's tables, circuit and config (pipeline.outputs.load.Run); `verify` checks
    its files against their checksums first."""
    from pipeline.outputs.load import load_run as load  # on use: `import pipeline` stays light

    return load(path, verify)
