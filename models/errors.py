class InputError(ValueError):
    """Bad input from the user: the message is one sentence naming the input, the problem and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """
