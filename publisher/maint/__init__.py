"""Repository upkeep: garbage collection, the consistency check, the state rebuild."""
