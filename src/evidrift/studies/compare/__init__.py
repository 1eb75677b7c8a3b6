"""`evidrift compare A B`: drift between two checkpoints of one model, as a CI gate."""
