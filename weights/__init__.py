"""The checkpoint the project ships (wan-world/, official Wan layout), read as package data."""
