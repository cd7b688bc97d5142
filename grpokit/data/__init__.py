"""Data: datasets from files, the hub and built-in tasks, turned into tokenised prompts."""
