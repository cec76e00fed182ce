"""Validation against a reference model: tasks, sandbox, generation, judges, statistics, gates."""
