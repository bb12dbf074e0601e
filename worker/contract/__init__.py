"""The wire contract: the command and result models, their codec, and the generated schemas."""
