"""The one error type of every room: bad input from the user, said in one sentence."""


class InputError(ValueError):
    """Bad input: the message is one sentence naming the input, what is wrong with it and what to do.

    Library functions name their own parameters in it (`max_tokens=1 must be at least 2`); the CLI
    maps those names to its flags, prints the sentence without a traceback and exits with status 2.
    """
