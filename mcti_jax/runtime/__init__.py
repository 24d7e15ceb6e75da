"""Where the program runs: the device mesh, several processes, stopping on a signal.

May import: errors.
"""
