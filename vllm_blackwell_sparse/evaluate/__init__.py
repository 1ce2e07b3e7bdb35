"""Tools: accuracy (``vbs eval``) and threshold calibration (``vbs calibrate``) on a real
model served by vLLM. ``tasks`` and ``fit`` are plain Python (testable without a GPU);
``engine`` runs inside the engine's process; ``run`` drives it and writes the results."""
