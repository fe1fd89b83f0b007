"""patchsweep: activation-patching sweeps that localise refusal in transformers."""

__version__ = "0.1.0"
