"""Torch-free helpers shared by every package of richfeedback (no import of rahf, generators, flows, ...)."""
