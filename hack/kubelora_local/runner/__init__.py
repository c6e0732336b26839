"""A minimal kubelet for local clusters: runs the Pods bound to Node `local-node` as local processes.

Dev/test only. The operator never knows this exists: it sees an ordinary node whose pods run,
become Ready, terminate and report termination messages, so the real controller-manager's Job,
ReplicaSet and garbage-collector controllers work unchanged.
"""
