"""The one exception type for problems a user can fix.

Library code raises `IgptError` with a message that names the problem and the fix;
the CLI prints it as a single line and exits non-zero, never with a traceback.
"""


class IgptError(Exception):
    """A user-fixable problem (bad path, corrupt file, mismatched palette, bad flag)."""
