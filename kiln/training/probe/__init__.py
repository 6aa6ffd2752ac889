"""Annealing probes (`kiln probe`): does a dataset help? A base model is annealed, with
the LR going linearly to 0, on the default mixture (the control) and on each candidate
mixed into it, over paired seeds; the verdict compares each candidate with the control.

    verdict   paired differences, intervals, verdicts and the ranking (this session)
"""
