"""Step-Audio real-time dialogue engine: the model library (no servers in here)."""

__version__ = "0.1.0"
