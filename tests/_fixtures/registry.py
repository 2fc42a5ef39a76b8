"""Shared pytest fixtures for the registry tests."""
