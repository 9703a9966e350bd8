"""stream: a real-time push service — pollers find what changed upstream, the hub fans it out."""

__version__ = "0.1.0"

__all__ = ["__version__"]
