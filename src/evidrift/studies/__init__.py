"""The studies: each a config section, a list of steps and report sections."""
