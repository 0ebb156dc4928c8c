"""The demo model's TAESD-class live preview decoder (see :mod:`.train`)."""
