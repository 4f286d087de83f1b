"""streamtrack: real-time object tracking on live video with SAM 2."""

__version__ = "0.1.0"
