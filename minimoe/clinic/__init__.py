"""Chapter 2 — the clinic: data, four models, and training them.

    optim.py      SGD with momentum and Adam, gradient clipping: one optimizer for every
                  ``params``/``grads`` pair
    data.py       the clinic: synthetic patients with hidden specialties, where routing pays
    models.py     the four clinics: a second opinion (ensemble), a generalist (dense FFN),
                  ask every specialist (dense MoE), a GP's referral (sparse MoE)
    train.py      the training loop: minibatches, train/eval mode, the history, which expert
                  serves which specialty
"""
