"""Lowest layer: the plan schema, geometry, errors, atomic files, the checkpoint format, work-folder paths."""
