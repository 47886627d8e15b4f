"""aerial-intelligence-pipeline: a local-first visual AI job service."""

__version__ = "0.1.0"
