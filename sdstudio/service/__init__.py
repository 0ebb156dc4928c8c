"""Running jobs for the UI and the API: progress and interruption (the durable queue comes next)."""
