"""What a command's expected failure is: one line printed, exit code 2.

Its own module so that `cli` (which catches it) and the commands it starts (`cli_node`,
which raises it) need not import each other.
"""


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""
