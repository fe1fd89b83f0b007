"""What the pipeline concludes from the engine's numbers: behaviour (the refusal judge, generation,
answer tokens), prompt pairs, position classes, statistics and the circuit search."""
