"""The circuit step: the method (method.py: `find_circuit`, named phases), its result (result.py: each
phase's typed result, circuit.json written and read back as `Circuit`), the evaluator that computes a
circuit's metric over the pairs (evaluator.py) and where the step is (progress.py)."""
