"""Running on hosts: mesh and sharding, distributed start, checkpoints, run files."""
