"""CoRe^2 for AR models (docs/design.md#core2-for-ar-models): the weak model, Collect, Reflect, and evaluation
sampling with any mode or schedule (Refine at scale).

    weak_model.py   the weak model: a small transformer predicting the CFG hidden state from the cond one
    collect.py      CFG trajectories of the base model into resumable shards
    reflect.py      training the weak model on collected shards
    sample.py       many images per condition as PNG files + samples.npz, any guidance mode or schedule
"""
