"""The one exception type for a user's mistake.

Anything raised as InputError is printed by the CLI as a single line (no traceback) and the
process exits with code 2. The message names the file or flag at fault and how to fix it.
"""


class InputError(Exception):
    """Bad input from the user: shown as one line, exit code 2."""


class StaleRunError(InputError):
    """A run folder holds a LoRA trained (or partly trained) from other inputs or settings: `edit` refuses
    to reuse it or to discard it (--restart does that); `loraedit batch` keeps it aside and trains again."""
