"""The one exception type for problems a user can fix.

Library code raises `IgptError` with a message that names the problem and the fix;
the CLI prints it as a single line and exits non-zero, never with a traceback.
"""


class IgptError(Exception):
    """A user-fixable problem (bad path, corrupt file, mismatched palette, bad flag)."""


def one_of(choices) -> str:
    """A message's list of allowed values, from the tuple that defines them: "'a', 'b' or 'c'"."""
    quoted = [repr(choice) for choice in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
