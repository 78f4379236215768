"""Ray-based orchestrator that runs the lab's methods as tracked, resumable, distributed experiments."""

__version__ = "0.1.0"
