"""Recipes: end-to-end setups on real models and tasks (recipes/<name>/README.md each)."""
