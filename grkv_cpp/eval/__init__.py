"""Evaluation: RULER data generation (`ruler`), its metrics (`metrics`), and the harness."""
