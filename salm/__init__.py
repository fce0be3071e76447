"""saLM: token-routed ensembles of frozen causal language models."""

__version__ = "0.1.0"
