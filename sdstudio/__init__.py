"""sdstudio: a Stable Diffusion studio — library, CLI, web UI and A1111-compatible API."""

__version__ = "0.1.0"
