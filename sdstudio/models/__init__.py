"""Model files: finding, hashing, safely reading, detecting the architecture, converting layouts, loading."""
