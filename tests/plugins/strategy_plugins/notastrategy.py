"""A module that is installed but is neither a strategy nor an evaluator."""

VALUE = 1
