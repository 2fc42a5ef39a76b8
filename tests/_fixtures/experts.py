"""Shared pytest fixtures for the experts tests."""
