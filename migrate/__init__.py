"""migrate: checkpoint, restore and live migration of running Linux processes."""

__version__ = "0.1.0"
