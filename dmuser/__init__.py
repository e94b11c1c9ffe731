"""dmuser: the Linux device-mapper, rebuilt in userspace Python."""

__version__ = "0.1.0"
