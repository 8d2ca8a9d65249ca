"""Shared by every test folder: pytest puts this folder on ``sys.path`` (helpers such as
``fs_snapshot`` import from here)."""
