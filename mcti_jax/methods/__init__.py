"""One module per method: its loss and nothing else. The trainer composes them."""
