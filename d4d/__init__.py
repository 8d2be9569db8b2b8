"""d4d: a training framework for Dream4D (image -> camera-controlled video -> 4D scene)."""
__version__ = "0.1.0"
