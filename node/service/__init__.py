"""The running node.

SCP, routing, spool, workers and their pipeline, forwarder, destinations, metrics.
"""
