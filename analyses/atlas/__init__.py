"""The head atlas: every head of one or more models characterised over a prompt set, and its summary tables."""
