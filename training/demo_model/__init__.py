"""The demo model: a small SD 1.x-architecture model trained from scratch on the shapes world
(:mod:`sdstudio.eval.shapes`), with our own code, on a CPU. ``python -m training.demo_model``."""
