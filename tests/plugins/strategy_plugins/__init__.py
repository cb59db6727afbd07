"""Modules the tests install on the server (on its PYTHONPATH, never in a job): a strategy, an evaluator,
and a module that is neither."""
