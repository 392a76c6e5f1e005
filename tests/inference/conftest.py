"""The after-training tests' tiny trained run, shared with these tests."""

from tests.after_training.conftest import session_overrides, tiny_run  # noqa: F401
