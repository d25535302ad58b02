"""The one error type of rcca_core: bad input, with a message that says what was wrong and what
is accepted. Its own module so that palette, masks and the rest share it without importing each other."""


class PaletteError(ValueError):
    """Bad palette input; the message says what was wrong and what is accepted."""
