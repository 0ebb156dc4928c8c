"""Fixtures for tests and benchmarks, kept apart from the runtime code: tiny random-weight checkpoints of
each family and other model files (``synthetic``), and a browser-driving helper for the page
(``headless``). Nothing in sdstudio's runtime imports this package."""
