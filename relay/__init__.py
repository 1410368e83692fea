"""relay: a transparent TCP relay that sends intercepted connections through an upstream proxy."""

__version__ = "0.1.0"
