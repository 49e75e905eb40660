"""golem.predictors: who guesses which experts come next, and how well.

Predictors are pure functions of what they are shown (a layer, its hidden state, the
routing history); they never touch files or the I/O scheduler.
"""
