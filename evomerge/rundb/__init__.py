"""The run database: an Optuna storage with a run-wide lock, candidate leases, the worker registry and run metadata."""
