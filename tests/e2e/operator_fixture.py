"""Session fixture running the real operator (``kubelora-operator``) against the local cluster.

Filled in by the operator work; kept as a plugin module so every e2e test file shares one operator.
"""
