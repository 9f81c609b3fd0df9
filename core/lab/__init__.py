"""Research-only code.

The paper's plain loop, the domain classifier, refiner training, the phantom generator.
"""
