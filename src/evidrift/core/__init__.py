"""The bottom layer: errors, atomic I/O and hashing, run paths, the maps store, the step runner,
distributed context and the config base. Imports nothing else of evidrift."""
