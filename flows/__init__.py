"""Prefect flows: the only package that imports prefect. Not built yet."""
