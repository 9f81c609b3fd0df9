"""Offline tools: evaluation, refiner training, benchmarks, phantom files, the demo.

Imported by ``cli`` only.
"""
