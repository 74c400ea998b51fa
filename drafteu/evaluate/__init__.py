"""Evaluation: fidelity against the ground truth, hallucination detection, cost."""
