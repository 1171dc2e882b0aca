"""Evaluators, one small module per task, each with one entry point the trainer calls."""
