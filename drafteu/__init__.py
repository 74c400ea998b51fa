"""drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of draft models."""

__version__ = "0.1.0"
