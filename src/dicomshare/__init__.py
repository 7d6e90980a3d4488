"""dicomshare: an open-source medical-imaging sharing server."""

__version__ = "0.1.0"
