"""The life of one command as plain async steps that know nothing of the broker."""
