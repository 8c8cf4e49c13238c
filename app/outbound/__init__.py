"""Conveyor calling out: where it may connect (SSRF guard) and how it signs what it sends."""
