"""ftc evaluator: generate answers on the held-out test set, score them, pick a winner, write the report."""
