"""One continual-learning method per module; see `edgecl.train.registry`."""
