"""The operators' tools: dead letters, publishing commands, the demo."""
