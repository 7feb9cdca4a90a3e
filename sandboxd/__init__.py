"""sandboxd: a rootless sandbox and resource-accounting service for untrusted code."""

__version__ = "0.1.0"
