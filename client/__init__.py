"""Clients of the real-time server: command line and browser demo."""
