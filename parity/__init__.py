"""Parity command line and demo."""
