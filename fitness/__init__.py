"""Fitness suites and their data. Shipped inside the wheel as the package evomerge.suites."""
