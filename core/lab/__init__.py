"""Research-only code: the paper's plain loop, the domain classifier, refiner training, the phantom generator."""
