"""aitbc-node: a single-box AITBC compute node."""

__version__ = "0.1.0"
