"""The package version, below everything that reports it (`carajax.__version__` re-exports it)."""

__version__ = "0.1.0"
