"""Tools on top of the drivers: benchmark, conversion, sweeps, prediction, the study."""
