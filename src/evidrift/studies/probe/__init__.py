"""The head probe ("How to Probe"): head and loss variants on one frozen backbone."""
