"""Annealing probes (`kiln probe`): does a dataset help? A base model is annealed, with
the LR going linearly to 0, on the default mixture (the control arm) and on each
candidate mixed into it (Llama 3: 30 % new data, 70 % default), over paired seeds; the
verdict compares each candidate with the control, with intervals.

    config      the probe file ([probe], [[candidate]], [[eval]])
    base        the model annealed and the LR it starts from
    candidates  each candidate as one domain of the arms' data (documents tokenized here)
    evals       what is measured: held-out and eval-set bits per byte, multiple choice
    run         plan (every input checked), the arms through the trainer, results
    verdict     paired differences, intervals, verdicts, ranking
    report      the printed table, the plot, decision accuracy

A part of its own, above curation and training: it tokenizes candidates with the
curation pipeline and anneals with the trainer.
"""
