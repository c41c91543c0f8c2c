"""Model and profile descriptions (models/*.yaml, profiles/*.yaml), read as package data."""
