"""Shared pytest fixtures for the router tests."""
