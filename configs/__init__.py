"""Experiment configs: each module has `get_config(arg=None)` returning a locked ConfigDict."""
