"""vpeft's version, in a module of its own so that records can name it without importing the package's API."""

__version__ = "0.1.0"
