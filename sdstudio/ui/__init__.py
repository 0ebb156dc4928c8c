"""The gradio web UI."""
