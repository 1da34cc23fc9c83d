"""What the tests share that is not a test: fixture modules (registered by tests/conftest.py)
and plain helpers. Nothing here is collected as a test."""
