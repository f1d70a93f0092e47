"""The search: search spaces, drivers (pure ask/tell), the evaluator and the loop that claims, scores and records candidates."""
