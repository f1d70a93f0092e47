"""A run directory: creating, opening and joining runs, status and plots, export, worker processes."""
