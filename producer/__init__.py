"""What other services use: the Python client and the CLI. Imports no torch."""

from smartdiff.producer.client import Client, FarmError, Job

__all__ = ["Client", "FarmError", "Job"]
