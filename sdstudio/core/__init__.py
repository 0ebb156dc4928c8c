"""Pure-Python building blocks (no torch): infotext, request types, names, output naming, grids."""
